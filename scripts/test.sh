#!/usr/bin/env bash
# Runs `go test -race -count=1 -timeout 15m $TESTFLAGS ./...` in each module,
# one module after the other, and fails at the end if any module failed.
#
#   scripts/test.sh [MODULE...]     (default: all modules)
#   TESTFLAGS=-short scripts/test.sh protocol
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

cd "$ROOT"
if (($# > 0)); then modules=("$@"); else mapfile -t modules < <(all_modules); fi
# TESTFLAGS is split on spaces on purpose: it holds several flags.
read -r -a extra <<<"${TESTFLAGS:-}"

summary=() passed=0 failed=0
for m in "${modules[@]}"; do
	is_module "$m" || die "$m is not a module directory"
	log ""
	log "=== $m: go test -race -count=1 -timeout 15m ${extra[*]:+${extra[*]} }./..."
	start=$SECONDS
	if (cd "$m" && go test -race -count=1 -timeout 15m "${extra[@]}" ./...); then
		status=ok
		passed=$((passed + 1))
	else
		status=FAIL
		failed=$((failed + 1))
	fi
	summary+=("$(printf '%-4s %-16s %s' "$status" "$m" "$(fmt_duration $((SECONDS - start)))")")
done

log ""
log "=== test summary (go test per module)"
printf '%s\n' "${summary[@]}"
log "modules: $passed passed, $failed failed"
((failed == 0))
