"""The output folder: results and errors files (`writer`), the folder's lock, fresh start and
repair after a crash (`folder`), the index of ids done (`ledger`)."""
