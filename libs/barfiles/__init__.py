"""Price files (CSV / Parquet bars): reading them and streaming them to the analytics service.

The one implementation shared by the command lines (`finsight ingest`,
`python -m services.analytics.importer_cli`) and the analytics service's sample loader:

* `reader`  - parse a file into exact-decimal bars and row rejections (no gRPC, no I/O
  beyond the file);
* `columns` - bars -> per-symbol micro-unit columns (prices with more than 6 decimals are
  rejected, never rounded);
* `options` - the ingest options both command lines take (no pyarrow: cheap to import);
* `ingest`  - the IngestBars client: `stream_file`, its counts and rejections.

A library: it imports nothing from `services` (tests/cli/test_layering.py).
"""
