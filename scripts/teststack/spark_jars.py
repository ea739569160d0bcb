#!/usr/bin/env python3
"""Completes the Iceberg 1.10 Spark runtime jar shipped on PyPI so that its REST catalog works.

(The project's test-stack recipe, ../shared/teststack/spark/jars.py, kept here so that
scripts/setup-test-env.sh needs nothing outside the repository.)

The jar in snowpark-connect-deps-iceberg (iceberg-spark-runtime-3.5_2.12-1.10.2.jar) was built
without the relocated copies of Jackson (org.apache.iceberg.shaded.com.fasterxml.jackson.*) and
of Apache HttpClient 5 / HttpCore 5 (org.apache.iceberg.shaded.org.apache.hc.*), which every
REST catalog call needs. This rebuilds them in pure Python, by renaming packages in class-file
constant pools (what the Maven shade plugin does), from:

  * Jackson 2.15.2 from pyspark's jars;
  * httpclient5 >= 5.4 / httpcore5 >= 5.3 jars from Debian packages. Iceberg 1.10's HTTPClient
    references org.apache.hc.client5.http.ssl.TlsSocketStrategy, which exists from httpclient5
    5.4 on; bookworm's libhttpclient5-java is 5.2.1 (no TlsSocketStrategy), so the jars come
    from Debian unstable's libhttpclient5-java / libhttpcore5-java .debs, fetched with apt-get
    download through a private apt configuration (the system's apt sources are untouched).

Usage:
  jars.py build  CACHE_DIR          builds CACHE_DIR/jars/*.jar (once), prints the class path
  jars.py scan   CACHE_DIR          lists org/apache/iceberg/shaded/* classes the runtime
                                    references and nobody provides (package-info excluded)
"""

import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile

HC_OLD = "org/apache/hc/"
HC_NEW = "org/apache/iceberg/shaded/org/apache/hc/"
JACKSON_OLD = "com/fasterxml/jackson/"
JACKSON_NEW = "org/apache/iceberg/shaded/com/fasterxml/jackson/"


def site_dirs():
    import pyspark
    import snowpark_connect_deps_iceberg as sdi
    runtime = sorted(glob.glob(os.path.join(os.path.dirname(sdi.__file__), "jars",
                                            "iceberg-spark-runtime-3.5_2.12-*.jar")))
    if not runtime:
        sys.exit("iceberg-spark-runtime-3.5_2.12 jar not found in snowpark_connect_deps_iceberg")
    return runtime[-1], os.path.join(os.path.dirname(pyspark.__file__), "jars")


def _mappings(pairs):
    out = []
    for old, new in pairs:
        out.append((old.encode(), new.encode()))
        out.append((old.replace("/", ".").encode(), new.replace("/", ".").encode()))
    return out


def relocate_class(data, maps):
    """Rewrites package names in every CONSTANT_Utf8 entry of a class file."""
    if data[:4] != b"\xca\xfe\xba\xbe":
        raise ValueError("not a class file")
    count = struct.unpack(">H", data[8:10])[0]
    i, k, out = 10, 1, bytearray(data[:10])
    while k < count:
        tag = data[i]
        if tag == 1:  # CONSTANT_Utf8
            n = struct.unpack(">H", data[i + 1:i + 3])[0]
            s = data[i + 3:i + 3 + n]
            for old, new in maps:
                if old in s:
                    s = s.replace(old, new)
            out += bytes([1]) + struct.pack(">H", len(s)) + s
            i += 3 + n
        else:
            if tag in (3, 4, 9, 10, 11, 12, 17, 18):
                width = 5
            elif tag in (5, 6):
                width = 9
                k += 1  # long/double take two slots
            elif tag in (7, 8, 16, 19, 20):
                width = 3
            elif tag == 15:
                width = 4
            else:
                raise ValueError("unknown constant-pool tag %d" % tag)
            out += data[i:i + width]
            i += width
        k += 1
    out += data[i:]
    return bytes(out)


def utf8_constants(data):
    count = struct.unpack(">H", data[8:10])[0]
    i, k, out = 10, 1, []
    while k < count:
        tag = data[i]
        if tag == 1:
            n = struct.unpack(">H", data[i + 1:i + 3])[0]
            out.append(data[i + 3:i + 3 + n])
            i += 3 + n
        else:
            i += {3: 5, 4: 5, 9: 5, 10: 5, 11: 5, 12: 5, 17: 5, 18: 5, 5: 9, 6: 9,
                  7: 3, 8: 3, 16: 3, 19: 3, 20: 3, 15: 4}[tag]
            if tag in (5, 6):
                k += 1
        k += 1
    return out


def build_relocated(dest, jars, pairs):
    """One jar with the classes (and resources) of `jars`, packages renamed by `pairs`."""
    if os.path.exists(dest):
        return dest
    maps = _mappings(pairs)
    tmp = dest + ".tmp"
    seen = set()
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        zo.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        for jar in jars:
            with zipfile.ZipFile(jar) as zi:
                for name in zi.namelist():
                    if (name.endswith("/") or name.startswith("META-INF/versions/")
                            or name.endswith("module-info.class")
                            or name == "META-INF/MANIFEST.MF"
                            or name.startswith("META-INF/maven/")):
                        continue
                    data = zi.read(name)
                    if name.endswith(".class"):
                        data = relocate_class(data, maps)
                    elif name.startswith("META-INF/services/"):
                        for old, new in maps:
                            data = data.replace(old, new)
                    for old, new in pairs:
                        if name.startswith(old):
                            name = new + name[len(old):]
                        elif name.startswith("META-INF/services/" + old.replace("/", ".")):
                            name = name.replace(old.replace("/", "."), new.replace("/", "."))
                    if name not in seen:
                        seen.add(name)
                        zo.writestr(name, data)
    os.replace(tmp, dest)
    return dest


def debian_mirror():
    """The Debian archive this machine's apt is configured with (deb822 or one-line sources)."""
    uris = []
    for path in glob.glob("/etc/apt/sources.list.d/*.sources"):
        uris += re.findall(r"^URIs:\s*(\S+)", open(path).read(), re.M)
    for path in ["/etc/apt/sources.list"] + glob.glob("/etc/apt/sources.list.d/*.list"):
        if os.path.exists(path):
            uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", open(path).read(), re.M)
    main = [u for u in uris if u.rstrip("/").endswith("/debian")]
    if not main:
        sys.exit("no Debian archive found in this machine's apt sources")
    # A third-party repository may end in /debian too (download.docker.com/linux/debian).
    official = [u for u in main if "debian.org" in u]
    return (official or main)[0]


def apt_get(opts, args, cwd=None, attempts=4):
    """Runs apt-get, again after a failure: unstable's mirrors are rewritten several times a
    day, and a run that meets one mid-sync gets a hash mismatch."""
    for attempt in range(1, attempts + 1):
        try:
            subprocess.check_call(["apt-get", "-q"] + opts + args, cwd=cwd, stdout=subprocess.DEVNULL)
            return
        except subprocess.CalledProcessError:
            if attempt == attempts:
                raise
            print("apt-get %s failed; trying again (%d of %d)" % (args[0], attempt + 1, attempts), file=sys.stderr)
            time.sleep(5 * attempt)


def debian_unstable_jars(cache):
    """httpclient5, httpcore5 and httpcore5-h2 jars from Debian unstable's .debs (once)."""
    debs = os.path.join(cache, "debs")

    def jars():
        names = ("httpclient5-5.*.jar", "httpcore5-5.*.jar", "httpcore5-h2-5.*.jar")
        found = [sorted(glob.glob(os.path.join(debs, "x/usr/share/java", n))) for n in names]
        return [f[-1] for f in found] if all(found) else None

    if jars():
        return jars()
    apt = os.path.join(cache, "apt-sid")
    for d in ("lists/partial", "cache/archives/partial", "etc"):
        os.makedirs(os.path.join(apt, d), exist_ok=True)
    os.makedirs(debs, exist_ok=True)
    with open(os.path.join(apt, "etc/sources.list"), "w") as f:
        f.write("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                "%s sid main\n" % debian_mirror())
    opts = ["-o", "Dir::Etc::sourcelist=%s/etc/sources.list" % apt,
            "-o", "Dir::Etc::sourceparts=/nonexistent",
            "-o", "Dir::State::Lists=%s/lists" % apt,
            "-o", "Dir::Cache=%s/cache" % apt,
            "-o", "Dir::State::status=/var/lib/dpkg/status",
            "-o", "APT::Sandbox::User=root",
            # Only the package lists: no translations, no AppStream metadata.
            "-o", "Acquire::Languages=none",
            "-o", "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
            "-o", "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            "-o", "Acquire::Retries=5"]
    apt_get(opts, ["update"])
    apt_get(opts, ["download", "libhttpclient5-java", "libhttpcore5-java"], cwd=debs)
    # Unpacked beside, then moved in whole: an interrupted unpack leaves no half jar behind.
    unpacked = os.path.join(debs, "x.partial")
    shutil.rmtree(unpacked, ignore_errors=True)
    for deb in glob.glob(os.path.join(debs, "*.deb")):
        subprocess.check_call(["dpkg-deb", "-x", deb, unpacked])
    shutil.rmtree(os.path.join(debs, "x"), ignore_errors=True)
    os.replace(unpacked, os.path.join(debs, "x"))
    if not jars():
        sys.exit("no httpclient5/httpcore5/httpcore5-h2 jar in the downloaded .debs")
    return jars()


def has_class(jar, cls):
    with zipfile.ZipFile(jar) as z:
        return cls in z.namelist()


def build(cache):
    jars_dir = os.path.join(cache, "jars")
    os.makedirs(jars_dir, exist_ok=True)
    runtime, pyspark_jars = site_dirs()
    jackson = []
    for name in ("jackson-core", "jackson-databind", "jackson-annotations",
                 "jackson-datatype-jsr310"):
        found = sorted(glob.glob(os.path.join(pyspark_jars, name + "-2.*.jar")))
        if not found:
            sys.exit("cannot find %s in %s" % (name, pyspark_jars))
        jackson.append(found[-1])
    out = [runtime, build_relocated(os.path.join(jars_dir, "iceberg-shaded-jackson.jar"),
                                    jackson, [(JACKSON_OLD, JACKSON_NEW)])]
    client, core, h2 = debian_unstable_jars(cache)
    if not has_class(client, "org/apache/hc/client5/http/ssl/TlsSocketStrategy.class"):
        sys.exit("%s has no TlsSocketStrategy (httpclient5 >= 5.4 needed)" % client)
    out.append(build_relocated(os.path.join(jars_dir, "iceberg-shaded-httpclient5.jar"),
                               [client, core, h2], [(HC_OLD, HC_NEW)]))
    return out


def scan(cache):
    """Classes under org/apache/iceberg/shaded/ that the runtime references and no jar has."""
    runtime, pyspark_jars = site_dirs()
    cp = build(cache)
    have = set()
    for j in cp + glob.glob(os.path.join(pyspark_jars, "*.jar")):
        with zipfile.ZipFile(j) as z:
            have.update(n[:-6] for n in z.namelist() if n.endswith(".class"))
    pat = re.compile(rb"(org/apache/iceberg/shaded/[A-Za-z0-9_/$]+)")
    missing = {}
    for j in cp:
        with zipfile.ZipFile(j) as z:
            for n in z.namelist():
                if not n.endswith(".class") or n.startswith("META-INF/versions"):
                    continue
                for s in utf8_constants(z.read(n)):
                    for m in pat.findall(s):
                        m = m.decode()
                        if m not in have and not m.endswith("/package"):
                            missing.setdefault(m, n)
    for m in sorted(missing):
        print("%s  (referenced by %s)" % (m, missing[m]))
    return missing


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "scan"):
        sys.exit(__doc__)
    if sys.argv[1] == "build":
        print(os.pathsep.join(build(sys.argv[2])))
    else:
        scan(sys.argv[2])
