#!/usr/bin/env bash
# Fails, listing the files, when gofmt would change any Go file of the
# repository (tracked, or new and not ignored), except generated *.pb.go and
# testdata.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

cd "$ROOT"
mapfile -t files < <(git ls-files --cached --others --exclude-standard -- '*.go' ':!:*.pb.go' ':!:*/testdata/*' |
	while IFS= read -r f; do [[ -f $f ]] && printf '%s\n' "$f"; done)
if ((${#files[@]} == 0)); then
	log "fmt-check: no Go files"
	exit 0
fi
rc=0
out=$(gofmt -l "${files[@]}" 2>&1) || rc=$?
if [[ -n $out || $rc != 0 ]]; then
	while IFS= read -r line; do printf '  %s\n' "$line"; done <<<"$out"
	die "fmt-check: the files above are not gofmt-ed, or do not parse (run 'gofmt -w' on them)"
fi
log "fmt-check: ${#files[@]} Go files gofmt-ed: OK"
