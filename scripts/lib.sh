# shellcheck shell=bash
# Shared helpers for the scripts in this directory; source it, don't run it.

# Module path prefix shared by every module of this repository.
KITEQ_PREFIX=github.com/kiteq/kiteq

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ROOT

log() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

# all_modules prints every module directory relative to the root (no "./"),
# sorted; the same find as the Makefile's, so new modules are picked up.
all_modules() {
	(cd "$ROOT" && find . -name go.mod -not -path './.git/*' -not -path '*/testdata/*' -exec dirname {} \; |
		sed -e 's|^\./||' | sort)
}

# is_module DIR succeeds when DIR (relative to the root) is one of all_modules.
is_module() {
	local want=$1 m
	while IFS= read -r m; do
		[[ $m == "$want" ]] && return 0
	done < <(all_modules)
	return 1
}

# module_of_import PATH prints the module directory that owns import path PATH
# (the longest module directory that is a prefix), or nothing.
module_of_import() {
	local path=$1 rest m best=
	[[ $path == "$KITEQ_PREFIX/"* ]] || return 0
	rest=${path#"$KITEQ_PREFIX/"}
	while IFS= read -r m; do
		if [[ $rest == "$m" || $rest == "$m/"* ]] && ((${#m} > ${#best})); then
			best=$m
		fi
	done < <(all_modules)
	[[ -n $best ]] && printf '%s\n' "$best"
	return 0
}

# gomod_requires DIR prints "path version indirect(0|1)" for every require
# directive of DIR/go.mod, read from `go mod edit -json`.
gomod_requires() {
	(cd "$ROOT/$1" && go mod edit -json) | awk '
		/^\t"Require": \[/ { in_req = 1; next }
		in_req && /^\t\]/ { in_req = 0 }
		in_req && /"Path":/ { flush(); p = $2; gsub(/[",]/, "", p); ind = 0 }
		in_req && /"Version":/ { v = $2; gsub(/[",]/, "", v) }
		in_req && /"Indirect": true/ { ind = 1 }
		function flush() { if (p != "") print p, v, ind; p = ""; v = "" }
		END { flush() }
	'
}

# gomod_replaces DIR prints "oldpath oldversion newpath newversion" for every
# replace directive of DIR/go.mod ("-" for an empty version).
gomod_replaces() {
	(cd "$ROOT/$1" && go mod edit -json) | awk '
		/^\t"Replace": \[/ { in_rep = 1; next }
		in_rep && /^\t\]/ { in_rep = 0; flush() }
		in_rep && /^\t\t\{/ { flush() }
		in_rep && /"Old": \{/ { side = "old" }
		in_rep && /"New": \{/ { side = "new" }
		in_rep && /"Path":/ { x = $2; gsub(/[",]/, "", x); path[side] = x }
		in_rep && /"Version":/ { x = $2; gsub(/[",]/, "", x); ver[side] = x }
		function flush() {
			if (path["old"] != "")
				print path["old"], (ver["old"] == "" ? "-" : ver["old"]), path["new"], (ver["new"] == "" ? "-" : ver["new"])
			delete path; delete ver
		}
		END { flush() }
	'
}

# fmt_duration SECONDS prints e.g. "1m05s" or "42s".
fmt_duration() {
	local s=$1
	if ((s >= 60)); then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}
