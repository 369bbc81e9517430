#!/usr/bin/env python3
"""Attaches or detaches a CNI network the way nerdctl's OCI hook and CRI do: each plugin of a conflist
is run in order (ADD) or in reverse (DEL), with the previous result and the port mappings passed on.

  cni.py ADD|DEL CONFLIST PORTS_JSON [NETNS CONTAINER_ID]

Without NETNS and CONTAINER_ID it is an OCI hook: the container state on stdin gives the id and the pid
whose network namespace is set up (for kata-rs, QEMU's). Plugins come from CNI_PATH (default
/usr/lib/cni, Debian's containernetworking-plugins)."""
import json
import os
import subprocess
import sys

action, conflist, ports = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if len(sys.argv) > 5:
    netns, cid = sys.argv[4], sys.argv[5]
else:
    state = json.load(sys.stdin)
    cid = state["id"]
    netns = "/proc/%d/ns/net" % state["pid"] if state.get("pid") else ""
conf = json.load(open(conflist))
cni_path = os.environ.get("CNI_PATH", "/usr/lib/cni")
plugins = conf["plugins"] if action == "ADD" else list(reversed(conf["plugins"]))
prev = None
for p in plugins:
    p = dict(p, name=conf["name"], cniVersion=conf["cniVersion"])
    if p.get("capabilities", {}).get("portMappings"):
        p["runtimeConfig"] = {"portMappings": ports}
    if prev is not None:
        p["prevResult"] = prev
    env = dict(os.environ, CNI_COMMAND=action, CNI_CONTAINERID=cid, CNI_NETNS=netns, CNI_IFNAME="eth0", CNI_PATH=cni_path)
    r = subprocess.run([os.path.join(cni_path, p["type"])], input=json.dumps(p).encode(), env=env, capture_output=True)
    if r.returncode != 0:
        sys.exit("cni.py: %s %s failed: %s %s" % (p["type"], action, r.stdout.decode(), r.stderr.decode()))
    if action == "ADD":
        prev = json.loads(r.stdout)
if action == "ADD":
    print(json.dumps(prev))
