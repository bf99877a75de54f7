"""astaire-throttle's reading of /etc/clearwater/config: parsed as shell text, never run."""
import logging
import sys
from pathlib import Path

import pytest

try:
    import astaire_throttle  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # running from a bare checkout: the package lives in throttle/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "throttle"))

from astaire_throttle.config import (
    DEFAULT_PERCENTAGE,
    InvalidPercentage,
    load_cpu_limit,
    parse_percentage,
)
from astaire.cluster.nodeconfig import parse_node_config as parse_shell_assignments  # the one node-config reader


def test_assignments_follow_shell_quoting_and_comments():
    text = """
# a comment line
local_ip=10.0.0.1
astaire_cpu_limit_percentage="20"   # trailing comment
quoted='a b # not a comment'
export exported=1
log_level=2 some_command --flag=3
spaced = 4
"""
    values = parse_shell_assignments(text)
    assert values["local_ip"] == "10.0.0.1"
    assert values["astaire_cpu_limit_percentage"] == "20"
    assert values["quoted"] == "a b # not a comment"
    assert values["exported"] == "1"
    assert values["log_level"] == "2"  # a command's own arguments are not settings
    assert "--flag" not in values and "spaced" not in values


def test_last_assignment_wins_and_unparseable_lines_are_skipped():
    values = parse_shell_assignments("a=1\nbroken='unclosed\na=2\n")
    assert values == {"a": "2"}


def test_config_is_never_executed(tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "config"
    cfg.write_text(f"astaire_cpu_limit_percentage=$(touch {marker}; echo 50)\n"
                   f"touch {marker}\n")
    assert load_cpu_limit(str(cfg)) == DEFAULT_PERCENTAGE  # "$(...)" is not a number
    assert not marker.exists()


@pytest.mark.parametrize("raw, expected", [("5", 5.0), ("20", 20.0), (" 7.5 ", 7.5), ("100", 100.0)])
def test_valid_percentages(raw, expected):
    assert parse_percentage(raw) == expected


@pytest.mark.parametrize("raw", ["abc", "", "0", "-3", "100.5", "101", "nan", "inf"])
def test_invalid_percentages_are_refused(raw):
    with pytest.raises(InvalidPercentage):
        parse_percentage(raw)


@pytest.mark.parametrize("line", ["astaire_cpu_limit_percentage=abc",
                                  "astaire_cpu_limit_percentage=0",
                                  "astaire_cpu_limit_percentage='-5'",
                                  'astaire_cpu_limit_percentage="150"'])
def test_invalid_setting_logs_an_error_and_uses_the_default(tmp_path, caplog, line):
    cfg = tmp_path / "config"
    cfg.write_text(line + "\n")
    with caplog.at_level(logging.INFO, logger="astaire_throttle"):
        assert load_cpu_limit(str(cfg)) == DEFAULT_PERCENTAGE == 5
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "invalid astaire_cpu_limit_percentage" in errors[0].getMessage()


def test_missing_setting_or_file_uses_the_default(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("local_ip=10.0.0.1\n")
    assert load_cpu_limit(str(cfg)) == 5
    assert load_cpu_limit(str(tmp_path / "absent")) == 5


def test_quoted_setting_is_read(tmp_path):
    cfg = tmp_path / "config"
    cfg.write_text("astaire_cpu_limit_percentage='12'\n")
    assert load_cpu_limit(str(cfg)) == 12
