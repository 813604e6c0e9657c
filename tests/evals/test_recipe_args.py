"""The recipe benchmarks' shared argument handling (evals.common.recipe_parser / parse_recipe_args), through the
three CLIs that use it."""

import pytest

from evals import quality_race, sequence_parallel, throughput

CLIS = [throughput, quality_race, sequence_parallel]


@pytest.mark.parametrize("cli", CLIS, ids=lambda m: m.__name__)
def test_a_recipe_without_the_flag_is_a_usage_error(cli, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["launch/configs/longvq_tiny.yaml"])
    assert exc.value.code == 2
    assert "'launch/configs/longvq_tiny.yaml' is not a key=value override (recipes go after --recipe)" in \
        capsys.readouterr().err


@pytest.mark.parametrize("cli", CLIS, ids=lambda m: m.__name__)
def test_recipes_and_overrides(cli):
    args = cli.parse_args(["--recipe", "a.yaml", "--recipe", "b.yaml", "train.compile=false"])
    assert args.recipes == ["a.yaml", "b.yaml"] and args.overrides == ["train.compile=false"]
    args = cli.parse_args([])
    assert args.recipes == cli.DEFAULT_RECIPES and args.recipes is not cli.DEFAULT_RECIPES
