"""From input lines to requests: the file or pipe (`reader`, `pipe`), one line in any of the
three shapes (`line`), records through a job's template (`template`), token estimates
(`tokens`), JSON (`jsonl`)."""
