"""The output folder: results and errors files (`writer`, their lines in `lines`), the folder's
lock and fresh start (`folder`), the repair after a crash (`repair`), the index of ids done
(`ledger`), what to say when it cannot be written (`device`), shards merged (`merge`,
`shards`, `ids`)."""
