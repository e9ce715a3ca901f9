"""The corpus's pieces on small made-up inputs: the roff reader, the /usr/share/doc file filter,
13-gram hashing within documents, export. No tokenizer needed."""
from __future__ import annotations

import gzip

import numpy as np

from memlm.train import corpus as C

MAN = r""".\" a comment
.TH DEMO 1 "2024" "demo 1.0"
.SH NAME
demo \- show \fBbold\fR and \fIitalic\fP text
.SH SYNOPSIS
.B demo
[\fB\-v\fR]
.SH DESCRIPTION
.PP
First paragraph,
continued here\(em with a dash.
.TP
.B \-v
Be verbose.
.nf
line one
line two
.fi
.de XX
.  ignored definition
..
"""


def test_roff_to_text_keeps_the_prose_and_drops_the_markup():
    text = C.roff_to_text(MAN)
    assert "NAME\n\ndemo - show bold and italic text" in text
    assert "First paragraph, continued here\u2014 with a dash." in text
    assert "-v\n\nBe verbose." in text or "-v Be verbose." in text
    assert "line one\nline two" in text
    for junk in ("\\f", ".TH", "comment", "ignored", ".PP"):
        assert junk not in text


def test_doc_filter_takes_prose_and_skips_changelogs_code_and_copyright(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    prose = "This package does useful things for people who need them. " * 10
    (pkg / "README").write_text(prose)
    with gzip.open(pkg / "changelog.Debian.gz", "wt") as f:
        f.write(prose)
    (pkg / "copyright").write_text(prose)
    (pkg / "example.c").write_text(prose)
    (pkg / "config.txt").write_text("int main(void) { return 0; }\n" * 20)
    docs = list(C._doc_documents(str(tmp_path), C._Packages(str(tmp_path / "no-dpkg"), str(tmp_path))))
    assert [d.doc_id for d in docs] == ["doc:demo/README"]
    assert docs[0].package == "demo" and docs[0].licence == "unstructured (see copyright file)"
    (pkg / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
                                   "Files: *\nLicense: GPL-2+\n\nFiles: doc/*\nLicense: MIT\n")
    docs = list(C._doc_documents(str(tmp_path), C._Packages(str(tmp_path / "no-dpkg"), str(tmp_path))))
    assert docs[0].licence == "GPL-2+; MIT"


def test_ngram_hashes_stay_inside_documents():
    a = np.arange(20)
    tokens = np.concatenate([a, a]).astype(np.uint16)  # two identical documents of 20 tokens
    starts = np.array([0, 20, 40])
    h, doc = C.ngram_hashes(tokens, starts, n=13)
    assert len(h) == 2 * (20 - 13 + 1)  # none crosses the boundary at 20
    assert (doc[:8] == 0).all() and (doc[8:] == 1).all()
    np.testing.assert_array_equal(h[:8], h[8:])  # the same 13-grams hash alike
    assert len(np.unique(h[:8])) == 8


def test_stdlib_documents_are_docstrings_per_file():
    docs = list(C.corpus_documents(("stdlib",), max_docs=3))
    assert len(docs) == 3 and all(d.doc_id.startswith("stdlib:") and d.licence.startswith("PSF") for d in docs)
    assert all(">>>" not in d.text for d in docs)


def test_export_writes_text_files_and_an_index(tmp_path):
    n = C.export_documents(tmp_path, ("stdlib",), max_docs=2)
    lines = (tmp_path / "documents.jsonl").read_text().splitlines()
    assert n == 2 == len(lines) and len(list((tmp_path / "stdlib").glob("*.txt"))) == 2
