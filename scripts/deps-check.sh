#!/usr/bin/env bash
# Checks the module dependency rules of ARCHITECTURE.md.
#
#   scripts/deps-check.sh [MODULE...]
#
# (a) each module's non-test import closure (`go list -deps ./...`) reaches only
#     what ARCHITECTURE's table allows; the offending import chain is printed;
# (b) client-go's closure is summarised on one line: the proof that a Go client
#     never pulls in the broker, a storage backend, MySQL, fx or zap;
# (c) every module that requires a third-party module requires the same version;
# (d) no module imports another module's internal/ packages.
# (a) and (b) run for the MODULEs given (default: all); (c) and (d) for all.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"

K=$KITEQ_PREFIX
PROTOBUF=google.golang.org/protobuf
ZK=github.com/go-zookeeper/zk
MYSQL=github.com/go-sql-driver/mysql
# go.uber.org/fx and what it pulls in (zap, which it logs with, included).
FX="go.uber.org/fx go.uber.org/dig go.uber.org/multierr go.uber.org/zap golang.org/x/sys"
# What the MySQL driver pulls in.
MYSQL_DEPS="$MYSQL filippo.io/edwards25519"

# rules MODULE sets ALLOW, DENY (space-separated import path prefixes; a prefix
# matches itself and the paths below it) and FX_PKG/FX_ALLOW (packages under
# FX_PKG may also reach FX_ALLOW), or returns 1 when any import is allowed and
# 2 when the module is not in the table. DENY wins over ALLOW and the module's
# own packages.
rules() {
	ALLOW='' DENY='' FX_PKG='' FX_ALLOW=''
	case $1 in
	protocol)
		ALLOW="$PROTOBUF"
		;;
	registry)
		ALLOW="$K/protocol $PROTOBUF $ZK"
		FX_PKG="$K/registry/registryfx"
		FX_ALLOW="$FX"
		;;
	storage)
		ALLOW="$K/protocol $PROTOBUF"
		;;
	storage-file)
		ALLOW="$K/storage $K/protocol $PROTOBUF $FX"
		;;
	storage-mysql)
		ALLOW="$K/storage $K/protocol $PROTOBUF $FX $MYSQL_DEPS"
		;;
	client-go)
		ALLOW="$K/protocol $K/registry $PROTOBUF $ZK"
		DENY="$K/registry/registryfx $K/broker $K/storage $K/storage-file $K/storage-mysql $K/benchmark $K/tools $K/tests
			$MYSQL go.uber.org/fx go.uber.org/dig go.uber.org/zap"
		;;
	broker | benchmark | tools | tests)
		return 1
		;;
	*)
		return 2
		;;
	esac
	return 0
}

# check_closure MODULE ROOTS ALLOW DENY LABEL: BFS over the import graph in
# $graph from ROOTS; prints the first disallowed package of every offending
# chain, with the chain, and a COUNT line.
check_closure() {
	awk -v self="$K/$1" -v roots="$2" -v allow="$3" -v deny="$4" -v label="$5" '
		function match_prefix(p, list,    n, arr, i) {
			n = split(list, arr, /[ \t\n]+/)
			for (i = 1; i <= n; i++)
				if (arr[i] != "" && (p == arr[i] || index(p, arr[i] "/") == 1)) return arr[i]
			return ""
		}
		{
			known[$1] = 1; mod[$1] = $2; adj[$1] = ""
			for (i = 3; i <= NF; i++) adj[$1] = adj[$1] " " $i
		}
		END {
			tail = 0
			n = split(roots, r, /[ \t\n]+/)
			for (i = 1; i <= n; i++) if (r[i] in known && !(r[i] in seen)) { seen[r[i]] = 1; queue[++tail] = r[i]; parent[r[i]] = "" }
			for (head = 1; head <= tail; head++) {
				u = queue[head]
				m = split(adj[u], vs, " ")
				for (j = 1; j <= m; j++) {
					v = vs[j]
					if (!(v in known) || (v in seen)) continue
					seen[v] = 1; parent[v] = u; queue[++tail] = v
				}
			}
			nbad = 0
			for (k = 1; k <= tail; k++) {
				p = queue[k]
				d = match_prefix(p, deny)
				ok = (d == "") && (match_prefix(p, self) != "" || match_prefix(p, allow) != "")
				if (ok) continue
				bad[p] = 1; nbad++
				# Report only where a chain first leaves the allowed set.
				if (parent[p] in bad) continue
				chain = p
				for (x = parent[p]; x != ""; x = parent[x]) chain = x " -> " chain
				printf "  %s: %s (%s, module %s)\n    import chain: %s\n", label, p, (d != "" ? "forbidden: " d : "not allowed"), mod[p], chain
			}
			# Per-module breakdown of the closure, for the summary.
			for (k = 1; k <= tail; k++) bymod[mod[queue[k]]]++
			sum = ""
			for (mp in bymod) sum = sum (sum == "" ? "" : ", ") mp " " bymod[mp]
			printf "COUNT\t%d\t%d\t%s\n", tail, nbad, sum
		}
	' "$graph"
}

failed=0
fail() {
	printf 'deps-check: FAIL: %s\n' "$*"
	failed=1
}

cd "$ROOT"
mapfile -t everything < <(all_modules)
if (($# > 0)); then modules=("$@"); else modules=("${everything[@]}"); fi

tmpdir=$(mktemp -d)
trap 'rm -rf "$tmpdir"' EXIT
graph=$tmpdir/graph

# (a), (b)
client_summary=
for m in "${modules[@]}"; do
	is_module "$m" || die "$m is not a module directory"
	rc=0
	rules "$m" || rc=$?
	if ((rc == 1)); then
		log "deps-check: $m: may import anything (ARCHITECTURE): closure not checked"
		continue
	elif ((rc == 2)); then
		log "deps-check: $m: not in ARCHITECTURE's module table: skipped (add a rule to scripts/deps-check.sh)"
		continue
	fi
	if ! (cd "$m" && go list -e -deps -f \
		'{{if not .Standard}}{{.ImportPath}} {{with .Module}}{{.Path}}{{else}}-{{end}}{{range .Imports}} {{.}}{{end}}{{end}}' \
		./... >"$graph" 2>"$tmpdir/err"); then
		cat "$tmpdir/err"
		fail "$m: go list -deps failed (does it build?)"
		continue
	fi
	mapfile -t roots < <(cd "$m" && go list -e -f '{{.ImportPath}}' ./...)
	plain=() fxroots=()
	for r in "${roots[@]}"; do
		if [[ -n $FX_PKG && ($r == "$FX_PKG" || $r == "$FX_PKG/"*) ]]; then fxroots+=("$r"); else plain+=("$r"); fi
	done
	bad=0 total=0 sum=
	run_group() { # ROOTS ALLOW DENY LABEL
		local out count
		out=$(check_closure "$m" "$1" "$2" "$3" "$4")
		count=$(grep $'^COUNT\t' <<<"$out")
		grep -v $'^COUNT\t' <<<"$out" || true
		IFS=$'\t' read -r _ n b s <<<"$count"
		if ((n > total)); then
			total=$n
			# "module count" pairs, largest first, own modules without the prefix.
			sum=$(tr ',' '\n' <<<"$s" | sed -e 's/^ *//' -e "s|^$K/||" | sort -k2,2nr -k1,1 | paste -sd, - | sed 's/,/, /g')
		fi
		bad=$((bad + b))
	}
	if ((${#plain[@]} > 0)); then
		run_group "${plain[*]}" "$ALLOW" "$DENY $FX_PKG" "$m"
	fi
	if ((${#fxroots[@]} > 0)); then
		run_group "${fxroots[*]}" "$ALLOW $FX_ALLOW" "$DENY" "$m (${FX_PKG#"$K/"})"
	fi
	# Count the whole closure the way the issue states it.
	total=$(wc -l <"$graph")
	if ((bad > 0)); then
		fail "$m: $bad package(s) outside what ARCHITECTURE allows ($(echo "$ALLOW" | xargs | tr ' ' ','))"
	else
		what="only ${m} and $(echo "$ALLOW" | xargs | sed "s|$K/||g; s/ /, /g")"
		[[ -n $FX_PKG ]] && what="$what; fx only from ${FX_PKG#"$K/"}"
		log "deps-check: $m: $total non-std packages, $what: OK"
	fi
	if [[ $m == client-go ]]; then
		client_summary="client-go: $total non-std packages ($sum)"
		if ((bad > 0)); then
			client_summary="$client_summary: FAIL"
		else
			client_summary="$client_summary, none from broker/storage/mysql/fx/zap/registryfx: OK"
		fi
	fi
done

# (c) one version per third-party module across all modules.
declare -A seen_version seen_in
version_bad=0
for m in "${everything[@]}"; do
	if ! reqs=$(gomod_requires "$m" 2>"$tmpdir/err"); then
		cat "$tmpdir/err"
		fail "$m: cannot read go.mod"
		continue
	fi
	while read -r path version indirect; do
		[[ -z $path || $path == "$K/"* ]] && continue
		[[ $indirect == 1 ]] && version_note="$version (indirect)" || version_note=$version
		if [[ -z ${seen_version[$path]:-} ]]; then
			seen_version[$path]=$version
			seen_in[$path]="$m requires $version_note"
		elif [[ ${seen_version[$path]} != "$version" ]]; then
			fail "$path: ${seen_in[$path]}, but $m requires $version_note (use one version everywhere: 'go get $path@VERSION' in each, then 'make tidy-check')"
			version_bad=1
		fi
	done <<<"$reqs"
done
((version_bad)) || log "deps-check: ${#seen_version[@]} third-party modules, one version each across ${#everything[@]} modules: OK"

# (d) no module imports another module's internal/.
internal_bad=0
for m in "${everything[@]}"; do
	# Files of this module: not those of nested modules, not testdata.
	prune=()
	for other in "${everything[@]}"; do
		[[ $other == "$m/"* ]] && prune+=(-path "./$other" -prune -o)
	done
	while IFS= read -r hit; do
		file=${hit%%:*}
		path=$(sed -E 's/.*"([^"]+)".*/\1/' <<<"${hit#*:*:}")
		[[ /$path/ == */internal/* ]] || continue
		owner=$(module_of_import "$path")
		if [[ -n $owner && $owner != "$m" ]]; then
			fail "$m imports $path, an internal package of module $owner ($m/${file#./})"
			internal_bad=1
		fi
	done < <(cd "$m" && { find . "${prune[@]}" -path '*/testdata' -prune -o -name '*.go' -print0 |
		xargs -0 -r grep -HnE '^[[:space:]]*(import[[:space:]]+)?([A-Za-z_.][A-Za-z0-9_]*[[:space:]]+)?"github\.com/kiteq/kiteq/[^"]*"' || true; })
done
((internal_bad)) || log "deps-check: no module imports another module's internal/: OK"

if [[ -n $client_summary ]]; then
	log "$client_summary"
elif [[ " ${modules[*]} " != *" client-go "* ]]; then
	log "deps-check: client-go not checked (not among: ${modules[*]})"
fi
if ((failed)); then
	die "deps-check failed"
fi
log "deps-check: OK"
