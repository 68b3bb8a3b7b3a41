"""The input of a run: the input table as requests, and which of them are pending.

- `read`: the input as requests (`id`, `prompt` from one column or `input.template`, the kept columns),
  ids checked, each row's `request_hash` and `precheck`, rows already final set aside, `run.limit`;
- `stage`: the survey (one counting pass over the input and the output table), and the pending rows
  staged once to a scratch table when the run takes more than one chunk.
"""
