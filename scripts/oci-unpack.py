#!/usr/bin/env python3
"""Unpacks an OCI image archive without a container runtime, for scripts/test-image.sh.

    oci-unpack.py ARCHIVE ROOTFS REPORT.json
    oci-unpack.py --self-test    # two synthetic layers with whiteouts, unpacked and checked

Reads the archive's index.json, follows it (through nested indexes) to the linux/amd64
manifest, verifies every blob's digest and size, and applies the layers in order into
ROOTFS, honouring whiteouts (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory).
Writes REPORT.json: the image config, the layers (compressed and uncompressed sizes) and the
archive's size. Refuses members that would land outside ROOTFS (absolute names, `..`, a path
through a symbolic link).
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def die(msg):
    print(f"oci-unpack: {msg}", file=sys.stderr)
    sys.exit(1)


def blob(archive, digest, size=None):
    algo, _, hexd = digest.partition(":")
    if algo != "sha256":
        die(f"unsupported digest {digest}")
    try:
        data = archive.extractfile(f"blobs/sha256/{hexd}").read()
    except KeyError:
        die(f"blob {digest} is missing")
    if hashlib.sha256(data).hexdigest() != hexd:
        die(f"blob {digest} does not match its digest")
    if size is not None and len(data) != size:
        die(f"blob {digest} has {len(data)} bytes, the descriptor says {size}")
    return data


def find_manifest(archive, index):
    for desc in index.get("manifests", []):
        media = desc.get("mediaType")
        plat = desc.get("platform", {"os": "linux", "architecture": "amd64"})
        if plat.get("os") != "linux" or plat.get("architecture") != "amd64":
            continue
        data = json.loads(blob(archive, desc["digest"], desc.get("size")))
        if media == INDEX or data.get("mediaType") == INDEX:
            return find_manifest(archive, data)
        if media in (MANIFEST, None):
            return data
    die("no linux/amd64 image manifest in the archive")


def safe_path(root, name):
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        die(f"layer member {name!r} escapes the root")
    path = root
    for p in parts[:-1]:
        path = os.path.join(path, p)
        if os.path.islink(path):
            die(f"layer member {name!r} goes through the symbolic link {path}")
    return os.path.join(root, *parts) if parts else root


def remove(path):
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def apply_layer(root, data, media):
    if media.endswith("+gzip") or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif media.endswith("+zstd"):
        die("zstd layers are not supported by this unpacker")
    uncompressed = len(data)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as layer:
        members = layer.getmembers()
        # Whiteouts apply to the layers below, before this layer's own files.
        for m in members:
            base = os.path.basename(m.name)
            if not base.startswith(".wh."):
                continue
            target_dir = os.path.dirname(safe_path(root, m.name))
            if base == ".wh..wh..opq":
                if os.path.isdir(target_dir):
                    for child in os.listdir(target_dir):
                        remove(os.path.join(target_dir, child))
            else:
                remove(os.path.join(target_dir, base[len(".wh."):]))
        for m in members:
            if os.path.basename(m.name).startswith(".wh."):
                continue
            dest = safe_path(root, m.name)
            if m.isdir():
                if os.path.lexists(dest) and not os.path.isdir(dest):
                    remove(dest)
                os.makedirs(dest, exist_ok=True)
            elif m.isreg():
                remove(dest)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "xb") as out:
                    shutil.copyfileobj(layer.extractfile(m), out)
            elif m.issym():
                remove(dest)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.symlink(m.linkname, dest)
            elif m.islnk():
                remove(dest)
                os.link(safe_path(root, m.linkname), dest)
            else:
                die(f"layer member {m.name!r}: unsupported type {m.type!r}")
            if not m.issym():
                os.chown(dest, m.uid, m.gid)
                os.chmod(dest, stat.S_IMODE(m.mode))
        # Directory modes last (a read-only directory would refuse its own files).
        for m in members:
            if m.isdir() and not os.path.basename(m.name).startswith(".wh."):
                dest = safe_path(root, m.name)
                os.chown(dest, m.uid, m.gid)
                os.chmod(dest, stat.S_IMODE(m.mode))
    return uncompressed, diff_id


def self_test():
    """Builds a two-layer archive (the second whites out a file and makes a directory opaque)
    and checks what unpacking leaves."""
    import tempfile

    def layer(entries):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, kind, data in entries:
                info = tarfile.TarInfo(name)
                if kind == "dir":
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    t.addfile(info)
                elif kind == "sym":
                    info.type, info.linkname = tarfile.SYMTYPE, data
                    t.addfile(info)
                else:
                    info.size, info.mode = len(data), 0o644
                    t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    def sha(b):
        return "sha256:" + hashlib.sha256(b).hexdigest()

    lower = layer([("a", "dir", None), ("a/x", "file", b"x"), ("a/y", "file", b"y"),
                   ("c", "dir", None), ("c/old", "file", b"old"), ("l", "sym", "a/y")])
    upper = layer([("a/.wh.x", "file", b""), ("c/.wh..wh..opq", "file", b""),
                   ("c/new", "file", b"new"), ("a/y", "file", b"y2")])
    blobs, layers = {}, []
    for raw in (lower, upper):
        gz = gzip.compress(raw, mtime=0)
        blobs[sha(gz)] = gz
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "digest": sha(gz), "size": len(gz)})
    config = json.dumps({"os": "linux", "architecture": "amd64",
                         "rootfs": {"type": "layers", "diff_ids": [sha(lower), sha(upper)]}}).encode()
    blobs[sha(config)] = config
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST, "layers": layers,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": sha(config), "size": len(config)}}).encode()
    blobs[sha(manifest)] = manifest
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": MANIFEST, "digest": sha(manifest), "size": len(manifest)}]}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, "test.oci.tar")
        with tarfile.open(archive, "w") as t:
            for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
                               ("index.json", index)] + \
                    [("blobs/sha256/" + d[7:], b) for d, b in blobs.items()]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        root = os.path.join(tmp, "root")
        sys.argv = [sys.argv[0], archive, root, os.path.join(tmp, "report.json")]
        main()
        found = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, dirs, files in os.walk(root) for f in files + dirs)
        assert found == ["a", "a/y", "c", "c/new", "l"], found
        assert open(os.path.join(root, "a/y")).read() == "y2"
        assert os.readlink(os.path.join(root, "l")) == "a/y"
    print("oci-unpack: self-test passed (whiteout, opaque directory, replaced file, symlink)")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    if len(sys.argv) != 4:
        die("usage: oci-unpack.py ARCHIVE ROOTFS REPORT.json")
    path, root, report = sys.argv[1:]
    if os.path.lexists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    with tarfile.open(path, "r:") as archive:
        layout = json.loads(archive.extractfile("oci-layout").read())
        if layout.get("imageLayoutVersion") != "1.0.0":
            die(f"unexpected oci-layout {layout}")
        index = json.loads(archive.extractfile("index.json").read())
        manifest = find_manifest(archive, index)
        cdesc = manifest["config"]
        config = json.loads(blob(archive, cdesc["digest"], cdesc.get("size")))
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(manifest["layers"]):
            die("the config's diff_ids do not match the manifest's layers")
        layers = []
        for desc, want in zip(manifest["layers"], diff_ids):
            data = blob(archive, desc["digest"], desc.get("size"))
            size, diff_id = apply_layer(root, data, desc["mediaType"])
            if diff_id != want:
                die(f"layer {desc['digest']}: uncompressed digest {diff_id}, config says {want}")
            layers.append(
                {"digest": desc["digest"], "mediaType": desc["mediaType"],
                 "compressed": len(data), "uncompressed": size}
            )
    out = {
        "archive_bytes": os.path.getsize(path),
        "ref": [m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                for m in index.get("manifests", [])],
        "config": config,
        "layers": layers,
    }
    with open(report, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
