"""Load tests in the MLSys 2026 MoE contest's terms against any OpenAI-compatible server.

The locustfile is ``loadtest/prompts.py``; the rest are plain modules that never import locust, so the statistics,
score and report code can be tested without a running load test:

- ``workload``: prompt files, contest baselines and accuracy references;
- ``stream``:   one streamed ``/v1/completions`` response turned into timings and token counts;
- ``metrics``:  percentiles, per-prompt summaries, the contest score;
- ``report``:   the JSON/CSV report;
- ``plots``:    the PNG figures (matplotlib, Agg backend).
"""
