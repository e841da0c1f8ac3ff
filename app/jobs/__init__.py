"""The job-execution domain: runs and evals are jobs, and every job goes through the same machinery.

- `states`: each kind's state machine (one table of allowed moves), how a run's move carries its
  stages along, and `JobKind` (what the machinery needs to know of a kind: model, table, task).
- `lease`: the atomic claim, the fence every write of an attempt starts with (`StaleAttempt`
  when the attempt lost the job), the end of an attempt, the heartbeat thread (`Lease`).
- `reaper`: one loop over both kinds: stale leases re-queued or failed, lost messages re-sent.
- `placement`: which worker may claim a run — the run's fit estimate against the devices the
  workers registered (422 `does_not_fit` at submit, the capacity check before a claim).

It lives in `app` because the API moves jobs too (create, cancel, resume) and `app` never imports
`worker`; the worker's tasks (`worker.runs`, `worker.evals`) call it.
"""
