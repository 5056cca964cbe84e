"""Every `lease` command's `--help` shows its options' defaults, names the `lease` command in its usage
line, and cites nothing outside the repository (issue 25)."""
import argparse

import pytest

from lease.cli_help import first_paragraph, show_defaults


def _help(capsys, main, argv) -> str:
    """What `main(argv + ["--help"])` prints (argparse exits 0 after printing)."""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _lease(argv):
    from pipeline.cli import main

    return main(argv)


def _bench(argv):
    from benchmarks.cli import main

    return main(argv)


def _stage(module):
    def main(argv):
        import importlib

        return importlib.import_module(module).main(argv)
    return main


# (command, main, argv before --help, usage prefix, texts its help must show)
COMMANDS = [
    ("lease run", _lease, ["run"], "usage: lease run", ["(default: demo)", "(default: lease)"]),
    ("lease config show", _lease, ["config", "show"], "usage: lease config show", ["(default: demo)"]),
    ("lease train", _lease, ["train"], "usage: lease train", ["--out OUT"]),
    ("lease train (module)", _stage("lease.train"), [], "usage: lease train", ["--out OUT"]),
    ("lease import-reference", _lease, ["import-reference"], "usage: lease import-reference",
     ["(default: 1024)", "(default: encoder)"]),
    ("lease manifest", _lease, ["manifest"], "usage: lease manifest", ["(default: 0.0)", "(default: full)"]),
    ("lease tokenize run", _lease, ["tokenize", "run"], "usage: lease tokenize run",
     ["(default: 10000)", "(default: maskgit)", "(default: ['train', 'val'])"]),
    ("lease kmeans train", _lease, ["kmeans", "train"], "usage: lease kmeans train",
     ["(default: 16384)", "(default: 20)"]),
    ("lease pack", _lease, ["pack"], "usage: lease pack", ["(default: 10000)", "(default: 1)"]),
    ("lease demo-data", _lease, ["demo-data"], "usage: lease demo-data", ["(default: 24)"]),
    ("lease deploy", _lease, ["deploy"], "usage: lease deploy", ["(default: demo)", "(default: full-pipeline)"]),
    ("lease eval features", _lease, ["eval", "features"], "usage: lease eval features",
     ["(default: mean)", "(default: 256)"]),
    ("lease eval features (module)", _stage("lease.evaluate.features"), [], "usage: lease eval features",
     ["(default: 256)"]),
    ("lease eval knn", _lease, ["eval", "knn"], "usage: lease eval knn",
     ["neighbours that vote for each query (default: 20, or --config's)", "(default: 0.07, or --config's)",
      "(default: the GPU when there is one, else the CPU)"]),
    ("lease eval linear-probe", _lease, ["eval", "linear-probe"], "usage: lease eval linear-probe",
     ["training epochs (default: 90, or --config's)", "feature artifact dir of the train split"]),
    ("lease bench knn", _bench, ["knn"], "usage: lease bench knn", ["(default: 1281167)", "(default: 768)"]),
    ("lease bench precompute", _bench, ["precompute"], "usage: lease bench precompute",
     ["(default: in1k_vitb)", "(default: [0])"]),
]


@pytest.mark.parametrize("command, main, argv, usage, shown", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_shows_defaults_and_cites_nothing_outside(capsys, command, main, argv, usage, shown):
    text = _help(capsys, main, argv)
    assert text.startswith(usage)
    for part in shown:
        assert part in " ".join(text.split()), f"{command} --help lacks {part!r}"
    assert "DESIGN.md" not in text
    assert "(default: None)" not in text and "(default: False)" not in text and "%(default)" not in text


def test_deploy_description_is_a_whole_sentence(capsys):
    text = _help(capsys, _lease, ["deploy"])
    description = " ".join(text.split("\n\n")[1].split())
    assert description.startswith("The `full-pipeline` deployment") and description.endswith(".")
    assert "served by this process, or registered on a `process` work pool" in description


def test_stage_descriptions_are_their_docstrings_first_paragraphs():
    import pipeline.kmeans
    import pipeline.tokenize

    assert first_paragraph("One line\nand its rest.\n\nNot this.") == "One line and its rest."
    for module in (pipeline.kmeans, pipeline.tokenize):
        description = first_paragraph(module.__doc__)
        assert description.endswith(".") and "DESIGN.md" not in description


def test_every_lease_sub_command_cites_no_outside_file():
    from pipeline.cli import build_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    texts = [parser.format_help() for parser in walk(build_parser())]
    assert len(texts) > 20
    assert not [t.splitlines()[0] for t in texts if "DESIGN.md" in t or "(default: None)" in t]


def test_show_defaults_skips_what_has_no_default_worth_showing():
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--name", default="x", help="a name")
    parser.add_argument("--none", default=None, help="nothing")
    parser.add_argument("--flag", action="store_true", help="on")
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="off")
    parser.add_argument("--many", action="append", default=[], help="repeatable")
    parser.add_argument("--empty", default="", help="empty")
    parser.add_argument("--own", default=5, help="has one (default: five)")
    parser.add_argument("--hidden", default=7, help=argparse.SUPPRESS)
    parser.add_argument("given", help="required positional")
    parser.add_argument("maybe", nargs="?", default="demo", help="optional positional")
    sub = parser.add_subparsers(dest="command").add_parser("sub")
    sub.add_argument("--k", type=int, default=16)
    show_defaults(show_defaults(parser))  # idempotent
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["n"] == "(default: %(default)s)" and helps["name"] == "a name (default: %(default)s)"
    assert helps["maybe"] == "optional positional (default: %(default)s)"
    for dest, text in [("none", "nothing"), ("flag", "on"), ("wait", "off"), ("many", "repeatable"),
                       ("empty", "empty"), ("own", "has one (default: five)"), ("hidden", argparse.SUPPRESS),
                       ("given", "required positional")]:
        assert helps[dest] == text, dest
    assert "(default: 16)" in sub.format_help() and "(default: demo)" in parser.format_help()
