"""The two reference clients, each run as its own process: `python -m bench.clients.bare`
(the ceiling) and `python -m bench.clients.naive` (what users write by hand). Each prints one
JSON summary line on stdout when done."""
