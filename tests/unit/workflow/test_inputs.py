"""A model's preprocessing hash: the settings that made its inputs, not the job layout."""

from medtx.config import load_config
from medtx.workflow.inputs import model_input_settings, output_settings, settings_hash


def test_the_job_layout_changes_no_models_preprocessing_hash():
    pre = load_config()["preprocess"]
    assert pre["job_per"] == "scan"  # the default
    steps = {**pre, "job_per": "step"}
    for brats in (False, True):
        assert settings_hash(model_input_settings(pre, "ants", brats=brats)) == settings_hash(
            model_input_settings(steps, "ants", brats=brats)
        )
    assert output_settings(steps) == output_settings(pre) and "job_per" not in output_settings(pre)
    # a setting that changes outputs still changes the hash
    n4 = {**pre, "n4": {**pre["n4"], "shrink_factor": 2}}
    assert settings_hash(model_input_settings(n4, "ants", brats=False)) != settings_hash(
        model_input_settings(pre, "ants", brats=False)
    )
