import pytest
import torch

from llmlab.distill.student import (StudentConfig, check_tokenizers, drop_layers, evenly_spaced, fresh_student,
                                    make_student)
from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers, load_model, save_model
from llmlab.models.tiny import byte_tokenizer, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 61]])


def four_layers(name="tiny-llama"):
    from llmlab.models.tiny import tiny_configs

    fields = dict(tiny_configs()[name])
    key = "n_layer" if "n_layer" in fields else "num_hidden_layers"
    import llmlab.models.tiny as tiny

    original = tiny.tiny_configs
    try:
        tiny.tiny_configs = lambda: {name: {**fields, key: 4}}
        model, tokenizer = tiny_model(name)
        return model.eval(), tokenizer  # GPT-2 has dropout
    finally:
        tiny.tiny_configs = original


def test_evenly_spaced_keeps_first_and_last():
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(5, 3) == [0, 2, 4]
    assert evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced(4, 1) == [3]
    assert len(evenly_spaced(30, 15)) == 15 and evenly_spaced(30, 15)[0] == 0 and evenly_spaced(30, 15)[-1] == 29
    with pytest.raises(LlmlabError, match="between 1 and"):
        evenly_spaced(4, 5)


def skip(module, args, kwargs, output):
    """A forward hook that makes a decoder layer the identity, whatever its output's structure."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_dropped_student_computes_the_kept_layers(name):
    teacher, _ = four_layers(name)
    student = drop_layers(teacher, [0, 3])
    assert len(decoder_layers(student)) == 2 and len(decoder_layers(teacher)) == 4
    # The same model with the dropped layers made identities gives the same logits.
    reference = __import__("copy").deepcopy(teacher)
    for i in (1, 2):
        decoder_layers(reference)[i].register_forward_hook(skip, with_kwargs=True)
    with torch.no_grad():
        torch.testing.assert_close(student(IDS).logits, reference(IDS).logits)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p is q for p, q in zip(student.parameters(), teacher.parameters()))


def test_dropped_student_saves_loads_and_generates_with_its_cache(tmp_path):
    teacher, tok = four_layers()
    student = drop_layers(teacher, [1, 3])
    save_model(student, tok, tmp_path / "s")
    loaded, _ = load_model(str(tmp_path / "s"))
    assert loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, student(IDS).logits)
        out = loaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
        full = loaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert out.tolist() == full.tolist()  # layer_idx renumbered: the KV cache has one slot per kept layer


def test_fresh_student_has_the_teacher_vocabulary():
    teacher, _ = load_model("tiny-llama")
    student = fresh_student(teacher, layers=1, overrides={"hidden_size": 32, "intermediate_size": 64})
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 32
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student(IDS).logits.shape == teacher(IDS).logits.shape
    again = fresh_student(teacher, layers=1, overrides={"hidden_size": 32, "intermediate_size": 64})
    torch.testing.assert_close(again.lm_head.weight, student.lm_head.weight)  # same seed, same weights
    with pytest.raises(LlmlabError, match="student.config"):
        fresh_student(teacher, overrides={"hidden_size": 30})  # not divisible by the heads


def test_make_student_from_a_folder_and_tokenizer_check(tmp_path):
    teacher, tok = load_model("tiny-llama")
    save_model(*load_model("tiny-qwen2"), tmp_path / "same")
    student, _ = make_student(StudentConfig(source=str(tmp_path / "same")), teacher, tok)
    assert student.config.model_type == "qwen2"
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    check_tokenizers(tok, byte_tokenizer())  # another object with the same vocabulary passes
    with pytest.raises(LlmlabError, match="tokenizers differ"):
        check_tokenizers(tok, other)


def test_student_config_checks():
    with pytest.raises(LlmlabError, match="student.layers"):
        StudentConfig(layers=0)
    with pytest.raises(LlmlabError, match="source drop"):
        StudentConfig(source="fresh", keep=[0])
    with pytest.raises(LlmlabError, match="source fresh"):
        StudentConfig(config={"hidden_size": 8})
    teacher, tok = load_model("tiny-llama")
    with pytest.raises(LlmlabError, match="0..1"):
        make_student(StudentConfig(keep=[0, 5]), teacher, tok)
