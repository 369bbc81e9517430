#!/usr/bin/env python3
"""Minimal read-only OCI distribution (Docker Registry HTTP API v2) server for tests.

usage: registry.py [IMAGE.tar REPO:TAG [REPO:TAG ...]] [--image TAR=REPO:TAG[,REPO:TAG...]]...
                   [--port N] [--port-file FILE]

Serves OCI image-layout tarballs (as mkimage.py writes: oci-layout, index.json,
blobs/sha256/<hex>) over plain HTTP on 127.0.0.1, for containerd to pull localhost:PORT/REPO:TAG.
The positional form loads one tarball under one or more names; --image (repeatable) adds more.
REPO may contain slashes; a leading registry host ("localhost:5000/") is dropped; no :TAG means
:latest. A tag resolves to the one manifest in index.json (if it lists several, index.json itself
is served as an image index). Blobs are re-hashed on load; a mismatch is fatal. --port 0 (the
default) picks a free port; the bound port is written to --port-file (tmp + rename) once
listening. Stdlib only, never writes anything else, logs only errors to stderr.
GET/HEAD /v2/ -> {}; /v2/<name>/manifests/<tag|digest>; /v2/<name>/blobs/<digest>.
Unknown -> 404 {"errors":[{"code":...,"message":...}]}; any other method -> 405.
"""
import argparse, hashlib, http.server, json, os, re, sys, tarfile

INDEX_T = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = {INDEX_T, "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json",
                  "application/vnd.docker.distribution.manifest.list.v2+json"}
BLOBS = {}   # digest -> bytes (shared by all images)
REPOS = {}   # name -> {"tags": {tag: digest}, "manifests": {digest: media type}, "blobs": set}
sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()

def parse_ref(ref):
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    if not name or not tag:
        sys.exit(f"registry.py: bad reference {ref!r}")
    return name, tag

def load(path, refs):
    files = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.isfile():
                files[m.name.removeprefix("./")] = tf.extractfile(m).read()
    if "oci-layout" not in files or "index.json" not in files:
        sys.exit(f"registry.py: {path}: not an OCI image layout")
    blobs = {n[6:].replace("/", ":", 1): d for n, d in files.items() if n.startswith("blobs/")}
    for digest, data in blobs.items():
        if sha(data) != digest:
            sys.exit(f"registry.py: {path}: blob {digest} has content digest {sha(data)}")
    manifests = {}

    def walk(desc):  # record manifests/indexes reachable from a descriptor
        digest, data = desc["digest"], blobs.get(desc["digest"])
        if data is None:
            sys.exit(f"registry.py: {path}: missing blob {digest}")
        mt = desc.get("mediaType") or json.loads(data).get("mediaType")
        if mt in MANIFEST_TYPES:
            manifests[digest] = mt
            for d in json.loads(data).get("manifests", []):
                walk(d)

    index = json.loads(files["index.json"])
    descs = index.get("manifests", [])
    for d in descs:
        walk(d)
    if len(descs) == 1:
        top = descs[0]["digest"]
    else:  # several manifests: serve index.json itself as the image index
        top = sha(files["index.json"])
        blobs[top] = files["index.json"]
        manifests[top] = index.get("mediaType", INDEX_T)
    BLOBS.update(blobs)
    for ref in refs:
        name, tag = parse_ref(ref)
        repo = REPOS.setdefault(name, {"tags": {}, "manifests": {}, "blobs": set()})
        repo["tags"][tag] = top
        repo["manifests"].update(manifests)
        repo["blobs"].update(blobs)

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kata-rs-test-registry"

    def log_message(self, *args):  # quiet: only log_error reaches stderr
        pass

    def log_error(self, fmt, *args):
        sys.stderr.write("registry.py: %s - %s\n" % (self.address_string(), fmt % args))

    def send(self, code, body, ctype="application/json", digest=None):
        self.send_response(code)
        hdrs = {"Content-Type": ctype, "Content-Length": len(body),
                "Docker-Distribution-API-Version": "registry/2.0", "Docker-Content-Digest": digest}
        for k, v in hdrs.items():
            if v is not None:
                self.send_header(k, str(v))
        self.end_headers()
        if self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    def error(self, code, err, msg):
        self.send(code, json.dumps({"errors": [{"code": err, "message": msg}]}).encode())

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/v2", "/v2/"):
            return self.send(200, b"{}")
        m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if not m:
            return self.error(404, "NOT_FOUND", f"no route for {path}")
        name, kind, ref = m.groups()
        repo = REPOS.get(name)
        if repo is None:
            return self.error(404, "NAME_UNKNOWN", f"repository {name} not known")
        if kind == "manifests":
            digest = repo["tags"].get(ref, ref)
            if digest not in repo["manifests"]:
                return self.error(404, "MANIFEST_UNKNOWN", f"manifest {ref} not known")
            return self.send(200, BLOBS[digest], repo["manifests"][digest], digest)
        if ref not in repo["blobs"]:
            return self.error(404, "BLOB_UNKNOWN", f"blob {ref} not known")
        self.send(200, BLOBS[ref], "application/octet-stream", ref)

    do_HEAD = do_GET

    def refuse(self):
        self.close_connection = True  # any request body is left unread
        self.error(405, "UNSUPPORTED", "this registry is read-only")

    def __getattr__(self, name):  # every other method (PUT, POST, DELETE, ...) -> 405
        if name.startswith("do_"):
            return self.refuse
        raise AttributeError(name)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("args", nargs="*", metavar="IMAGE.tar REPO:TAG")
    ap.add_argument("--image", action="append", default=[], metavar="TAR=REPO:TAG[,REPO:TAG]")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    a = ap.parse_intermixed_args()
    if a.args:
        if len(a.args) < 2:
            ap.error("IMAGE.tar needs at least one REPO:TAG")
        load(a.args[0], a.args[1:])
    for spec in a.image:
        tar, sep, refs = spec.partition("=")
        if not sep or not refs:
            ap.error(f"--image {spec!r}: expected TAR=REPO:TAG")
        load(tar, refs.split(","))
    if not REPOS:
        ap.error("no image given")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{srv.server_address[1]}\n")
        os.replace(tmp, a.port_file)
    srv.serve_forever()

if __name__ == "__main__":
    main()
