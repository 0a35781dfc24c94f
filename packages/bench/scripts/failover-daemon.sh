#!/bin/bash
# Failover through a running daemon: 256 MiB buffered (64 MiB committed through vol0/primary, 192 MiB in
# the secondary buffer), fio 4K random reads and writes at QD4 on vol0/secondary across the failover.
# Prints the CLI's round trip, the engine's foreground and durable times, the time from the failover call
# to the first FLUSH returned, and fio's longest request. Run from the repository root after a build:
#   bash packages/bench/scripts/failover-daemon.sh
set -euo pipefail
D=$(mktemp -d /tmp/gannet-failover-XXXX)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
gannet() { node packages/server/bin/gannet.js "$@"; }
node packages/server/bin/gannet.js serve --data-dir "$D" --nbd 127.0.0.1:0 --control 127.0.0.1:0 --volume vol0:1G > "$D/log" 2>&1 &
PID=$!
for _ in $(seq 1 200); do grep -q "gannet ready" "$D/log" && break; sleep 0.1; done
NBD=$(grep -o 'nbd://127.0.0.1:[0-9]*' "$D/log" | head -1 | sed 's#nbd://##')
CONTROL=$(grep -oE 'control[^0-9]*127\.0\.0\.1:[0-9]+' "$D/log" | grep -oE '127\.0\.0\.1:[0-9]+' | head -1)
qemu-io -f raw "nbd://$NBD/vol0%2Fprimary" -c 'write -P 0x11 0 64M' > /dev/null
gannet checkpoint vol0 --control "$CONTROL" --data-dir "$D" > /dev/null
qemu-io -f raw "nbd://$NBD/vol0%2Fsecondary" -c 'write -P 0x22 64M 192M' > /dev/null
fio --name=io --ioengine=nbd --uri="nbd://$NBD/vol0%2Fsecondary" --rw=randrw --bs=4k --iodepth=4 --size=1G \
  --time_based --runtime=8 --output-format=json > "$D/fio.json" 2> "$D/fio.err" &
FIO=$!
sleep 3
T0=$(date +%s%N)
gannet failover vol0 --to secondary --control "$CONTROL" --data-dir "$D" > /dev/null
T1=$(date +%s%N)
qemu-io -f raw "nbd://$NBD/vol0%2Fsecondary" -c 'flush' > /dev/null
T2=$(date +%s%N)
wait "$FIO"
echo "gannet failover (CLI, node start included): $(( (T1 - T0) / 1000000 )) ms"
echo "failover call to the first FLUSH returned: $(( (T2 - T0) / 1000000 )) ms"
curl -s -H "authorization: Bearer $(cat "$D/control.token")" "http://$CONTROL/v1/volumes/vol0" |
  python3 -c 'import json, sys; f = json.load(sys.stdin)["failover"]; print("engine: foreground %.2f ms, durable %.0f ms" % (f["foregroundMs"], f["durableMs"]))'
# fio's nbd engine prints a line before its JSON.
python3 -c '
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
for kind in ("read", "write"):
    clat = job[kind]["clat_ns"]
    print("fio %s: %.0f IOPS, longest %.1f ms, p99.9 %.1f ms" % (kind, job[kind]["iops"], clat["max"] / 1e6, clat["percentile"]["99.900000"] / 1e6))
' "$D/fio.json"
