"""The batch tier (`--tier batch`): the pending lines sent as a provider's batches at about
half price, exactly once whatever is killed when. stage -> submit -> follow -> take in ->
go again, each a module; `dispatch` runs them, `book` is their memory in the ledger."""
