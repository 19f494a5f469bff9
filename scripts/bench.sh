#!/usr/bin/env bash
# bench.sh [kiteq-bench suite flags]: builds the KiteQ broker, nats-server
# (v2.15.2, the tool line of benchmark/go.mod) and kiteq-bench into ./bin, then runs the
# standard suite against them and the RabbitMQ on 127.0.0.1:5672, writing
# docs/benchmarks.md and docs/benchmarks/.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

mkdir -p bin
log "bench: go build broker/cmd/kiteq, benchmark/cmd/kiteq-bench, and nats-server (the version benchmark/go.mod requires) into ./bin"
go build -o bin/kiteq ./broker/cmd/kiteq
go build -o bin/kiteq-bench ./benchmark/cmd/kiteq-bench
(cd benchmark && go build -o ../bin/nats-server github.com/nats-io/nats-server/v2)
NATSCLI_VERSION=v0.5.0
if ! bin/nats --version 2>/dev/null | grep -qx "$NATSCLI_VERSION"; then
	log "bench: go install github.com/nats-io/natscli/nats@$NATSCLI_VERSION into ./bin (for the nats bench check)"
	GOBIN="$ROOT/bin" GOWORK=off go install "github.com/nats-io/natscli/nats@$NATSCLI_VERSION"
fi
case " $* " in
*" -rabbitmq"*) ;;
*)
	if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
		die "bench: no RabbitMQ on 127.0.0.1:5672 (start it, or pass -rabbitmq=amqp://user:pass@host:port/)"
	fi
	;;
esac
log "bench: bin/kiteq-bench suite $*"
exec bin/kiteq-bench suite -kiteq-bin=bin/kiteq -nats-server=bin/nats-server -nats-cli=bin/nats "$@"
