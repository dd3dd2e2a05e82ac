#!/usr/bin/env python3
"""Writes the ledger golden files from EdgeVPN's block format as the spec describes it
(kairos-p2p-trustedboot-k8s.md A.7.1), independently of the Rust code: Go's encoding/json
(keys sorted, HTML escapes, no spaces), legacy entries as bare JSON strings, signed entries as
objects, and Hash = sha256(fmt.Sprint(Index, Timestamp, Storage, PrevHash)).
Run it to regenerate; the Rust test reads what it wrote."""
import base64, hashlib, json, pathlib

HERE = pathlib.Path(__file__).parent

def go_str(s):
    out = json.dumps(s, ensure_ascii=False)
    for c, e in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(c, e)
    return out

def entry_json(e):
    legacy = not e.get("Owner") and not e.get("Sig") and not e.get("Deleted") and not e.get("Version")
    if legacy:
        return go_str(e["Value"])
    sig = go_str(base64.b64encode(e["Sig"]).decode()) if e.get("Sig") else "null"
    return ('{"Value":%s,"Owner":%s,"Version":%d,"UpdatedAt":%d,"Deleted":%s,"Sig":%s}'
            % (go_str(e["Value"]), go_str(e.get("Owner", "")), e.get("Version", 0),
               e.get("UpdatedAt", 0), "true" if e.get("Deleted") else "false", sig))

def sprint_entry(e):
    sig = " ".join(str(b) for b in e.get("Sig", b""))
    return "{%s %s %d %d %s [%s]}" % (e["Value"], e.get("Owner", ""), e.get("Version", 0),
                                     e.get("UpdatedAt", 0), "true" if e.get("Deleted") else "false", sig)

def block(index, ts, storage, prev):
    sprint = "%d%smap[%s]%s" % (index, ts, " ".join(
        "%s:map[%s]" % (b, " ".join("%s:%s" % (k, sprint_entry(storage[b][k])) for k in sorted(storage[b])))
        for b in sorted(storage)), prev)
    h = hashlib.sha256(sprint.encode()).hexdigest()
    st = "{%s}" % ",".join("%s:{%s}" % (go_str(b), ",".join("%s:%s" % (go_str(k), entry_json(storage[b][k])) for k in sorted(storage[b]))) for b in sorted(storage))
    return '{"Index":%d,"Timestamp":%s,"Storage":%s,"Hash":%s,"PrevHash":%s}' % (index, go_str(ts), st, go_str(h), go_str(prev)), h

GENESIS = hashlib.sha256(b"0map[]").hexdigest()
storage = {
    "kairos": {
        "a1b2-uuid": {"Value": json.dumps({"Time": "2026-12-02T10:00:00Z"}, separators=(",", ":"))},
        "leader-auto": {"Value": '"a1b2"'},
    },
    "dns": {"node1.mesh.": {"Value": '{"1":"10.1.0.5"}'}},
    "machines": {"10.1.0.2": {
        "Value": '{"Address":"10.1.0.2","Arch":"amd64","Hostname":"n\\u003c1\\u003e","OS":"linux","PeerID":"12D3KooWQ","Version":"x"}',
        "Owner": "12D3KooWQ", "Version": 1796205600000000000, "UpdatedAt": 1796205600,
        "Sig": bytes(range(0, 64))}},
    "healthcheck": {"12D3KooWQ": {"Value": '"2026-12-02T10:00:00Z"', "Owner": "12D3KooWQ",
                                   "Version": 7, "UpdatedAt": 1796205600, "Deleted": True}},
}
text, h = block(1, "2026-12-02 10:00:00.5 +0000 UTC", storage, GENESIS)
(HERE / "block-1.json").write_text(text)
(HERE / "block-1.hash").write_text(h + "\n")
