#!/usr/bin/env bash
# Nightly, incremental tagging of a growing photo archive (see crontab.txt beside this file).
#
# Unchanged files are carried over without being opened, new and changed ones are tagged, and
# rows of deleted files are dropped. A run killed half-way (reboot, OOM killer) resumes from
# what it had flushed. Each run appends one JSON summary line to $LOG. A file that crashes or
# hangs a decoder becomes an error row: decoding runs in worker or helper processes, which omni
# replaces when one dies (do not add --workers 0, which decodes in omni's own process).
#
# OUT has no .parquet suffix, so it is an archive: a folder of Parquet parts in which a night
# rewrites only the parts that hold a change (see README, "Output: one file or an archive").
# Read it with pd.read_parquet("$OUT") or DuckDB's read_parquet('$OUT/*.parquet').
set -u
ARCHIVE=${ARCHIVE:-/srv/photos}
OUT=${OUT:-/srv/tags/tags}
LABELS=${LABELS:-/etc/omni/labels.txt}
LOG=${LOG:-/var/log/omni/nightly.jsonl}
OMNI=${OMNI:-omni}

mkdir -p "$(dirname "$LOG")"
"$OMNI" tag "$ARCHIVE" --labels "$LABELS" -o "$OUT" --log-json >>"$LOG" 2>&1
code=$?
case $code in
  0) ;;                                            # every image tagged
  3) ;;                                            # done; unreadable files are `error` rows
  4) echo "omni: last night's run still holds $OUT.lock; skipped" >&2 ;;
  *) echo "omni: failed with exit code $code; see $LOG" >&2; exit "$code" ;;
esac
