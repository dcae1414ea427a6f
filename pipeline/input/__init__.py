"""From input lines to requests: the file or pipe (`reader`, `pipe`), the three line shapes,
records through a job's template (`template`), token estimates (`tokens`), JSON (`jsonl`)."""
