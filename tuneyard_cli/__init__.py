"""The `tuneyard` command line: the server side (`server`: migrate, api, worker, reaper, keys, up),
the HTTP client (`client`: datasets, runs, checkpoints) and the `up --demo` walkthrough (`demo`).

It sits above every other layer: it starts the API (`app`) and the workers (`worker`), so neither
of those needs to import the other.
"""
