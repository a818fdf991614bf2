#!/usr/bin/env bash
# The main job, inside the lab: rdax-server in the storage namespace, `rdax put`
# from the client namespace, then the bytes checked on the storage side.
set -euo pipefail
set -a; source /run/rdax-lab.env; set +a
[[ -z ${RDAX_LAB_ERRORS:-} ]] || { echo "demo: the lab is not usable: $RDAX_LAB_ERRORS"; exit 1; }
MB=${DEMO_MB:-256}
PORT=7710
export_root=$RDAX_DAX_MOUNT/export
mkdir -p "$export_root/demo"  # the operator makes directories; rdax never creates them
src=/tmp/demo-source
head -c "${MB}M" /dev/urandom > "$src"
size=$(stat -c %s "$src")

# Throwaway mutual-TLS material, made the way an operator would (no openssl), and a policy that lets the demo
# client write beneath demo/.
pki=/run/rdax-demo-pki
rdax-admin certs ca --dir "$pki" --name "rdax demo CA" --force >/dev/null
rdax-admin certs node --dir "$pki" --name node --ip "$RDAX_STORAGE_IP" >/dev/null
rdax-admin certs client --dir "$pki" --identity spiffe://rdax.demo/client --name client >/dev/null
cat > "$pki/policy.toml" <<'POLICY'
[[allow]]
identity = "spiffe://rdax.demo/client"
paths = ["demo/**"]
create = true
access = ["write", "read", "flush"]
POLICY
echo "demo: mTLS certificates and policy in $pki (rdax-admin certs)"

ip netns exec storage rdax-server --root "$export_root" --listen "$RDAX_STORAGE_IP:$PORT" \
    --device "$RDAX_STORAGE_DEV" --tls-cert "$pki/node.pem" --tls-key "$pki/node.key" \
    --tls-client-ca "$pki/ca.pem" --policy "$pki/policy.toml" --audit-log /tmp/rdax-audit.jsonl \
    > /tmp/rdax-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    grep -q "listening on" /tmp/rdax-server.log && break
    kill -0 $server 2>/dev/null || { cat /tmp/rdax-server.log; echo "demo: rdax-server died"; exit 1; }
    sleep 0.5
done
grep -q "listening on" /tmp/rdax-server.log || { cat /tmp/rdax-server.log; echo "demo: rdax-server did not start"; exit 1; }
echo "demo: $(grep 'listening on' /tmp/rdax-server.log)"

echo "demo: rdax put $MB MiB from the client namespace ($RDAX_CLIENT_IP) into $export_root/demo/blob"
export RDAX_TLS_CA=$pki/ca.pem RDAX_TLS_CERT=$pki/client.pem RDAX_TLS_KEY=$pki/client.key
out=$(ip netns exec client rdax --target "$RDAX_STORAGE_IP:$PORT" put -q "$src" demo/blob)
echo "demo: $out"
client_sha=$(sha256sum < "$src" | cut -d' ' -f1)
# The storage side reads the file itself, through the filesystem, not through rdax.
storage_sha=$(ip netns exec storage head -c "$size" "$export_root/demo/blob" | sha256sum | cut -d' ' -f1)
rate=$(sed -n 's/.*(\([0-9.]* MiB\/s\)).*/\1/p' <<< "$out")
if [[ $client_sha == "$storage_sha" ]]; then
    echo "verified: $size bytes at $rate, sha256 $storage_sha on the storage side equals the source"
else
    echo "MISMATCH: source sha256 $client_sha, storage side $storage_sha"
    exit 1
fi
