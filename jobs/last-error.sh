#!/usr/bin/env bash
# The reason a job's tagger run failed, for the one line cron mails: the tagger's last
# "error:" sentence in LOG, else the log's last line (a traceback's, or the shell's
# "command not found").
#
#   last-error.sh LOG
{ grep -E '^(error|Error):' "$1" || grep -v '^[[:space:]]*$' "$1" || true; } | tail -n 1 | sed 's/^[Ee]rror: //'
