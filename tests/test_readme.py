"""The README stays true: CI runs its test command, and its Python quick start runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_readme_main_command_runs_the_reproduction():
    main_cmd = _bash_blocks()[0].strip()
    assert main_cmd.startswith("python3 -m venv .venv") and "intertwiners reproduce" in main_cmd
    assert "-c constraints.txt" in main_cmd
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_readme_python_quick_start_runs():
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    exec(compile(code, "README.md", "exec"), {})


def test_readme_cli_examples_name_real_subcommands():
    from intertwiners.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for line in _bash_blocks()[2].strip().splitlines():
        words = line.split("#")[0].split()
        assert words[1] in sub.choices, line
        parser.parse_args(words[1:])  # every flag in the example exists (argparse exits otherwise)
