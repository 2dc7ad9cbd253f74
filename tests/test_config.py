import pytest

from labserver import EngineConfig, SamplingParams


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(max_tokens=1.5), dict(temperature=-0.1),
                                    dict(temperature=2.5), dict(top_p=0), dict(top_p=1.1)])
def test_bad_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_engine_config_from_env(monkeypatch):
    monkeypatch.setenv("LABSERVER_MODEL", "/some/folder")
    monkeypatch.setenv("LABSERVER_THREADS", "1")
    cfg = EngineConfig.from_env(dtype="bfloat16", model=None)
    assert (cfg.model, cfg.threads, cfg.dtype) == ("/some/folder", 1, "bfloat16")
    with pytest.raises(TypeError):
        EngineConfig.from_env(nonsense=1)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")


def test_threads_are_capped_to_the_cores():
    import os
    assert EngineConfig(threads=512).threads == os.cpu_count()


def test_quant_has_one_spelling_for_no_quantization():
    assert EngineConfig(impl="transformers", quant="none").quant == "none"  # the only quant transformers takes
    with pytest.raises(ValueError, match="lean runner"):
        EngineConfig(impl="transformers", quant="fp16")
    for bad in (None, "None", "", "q4_0"):
        with pytest.raises(ValueError, match="quant must be one of"):
            EngineConfig(quant=bad)
