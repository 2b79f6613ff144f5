"""Chat data and packing for causal LM: the loss falls on every assistant turn and nothing else, ShareGPT reads as
OpenAI-style messages, what a user gets wrong is named by row (exit 2), task.chat_template, predict on a chat run;
packed rows score exactly as their documents one by one, no label crosses a document, and resume is unchanged."""

import json
import shutil

import pytest
import torch

from peftkit import dropout, packing, train
from peftkit.methods.base import trainable_tensors
from peftkit.recipe import validate
from peftkit.tasks import causal_lm

from . import test_causal_lm
from .conftest import peftkit_here
from .test_causal_lm import CHAT, tokenizer_of
from .test_train import job_for, same

# system / user / assistant, twice: what each assistant turn should train on is its content and its end marker
CONVERSATION = [
    {"role": "system", "content": "a dull story"},
    {"role": "user", "content": "was the movie good"},
    {"role": "assistant", "content": "superb and moving"},
    {"role": "user", "content": "and the plot"},
    {"role": "assistant", "content": "boring"},
]
tiny_llama = test_causal_lm.tiny_llama  # the fixture: a 2-layer Llama whose tokenizer has a chat template


def sharegpt_role(role: str) -> str:
    return {"user": "human", "assistant": "gpt"}.get(role, role)


SHAREGPT = [{"from": sharegpt_role(m["role"]), "value": m["content"]} for m in CONVERSATION]


def scored_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The scored tokens, as the text of each unbroken run of them."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def encode(rows: list, tokenizer, **task) -> dict:
    config = causal_lm.Config(type="causal_lm", **task)
    return causal_lm._chats(
        {"messages": rows, "source_row": list(range(1, len(rows) + 1))}, tokenizer, config, "messages"
    )


def test_the_loss_falls_on_every_assistant_turn_and_nothing_else(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    out = encode([CONVERSATION], tokenizer)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert ids == list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    # each assistant turn's content and its end-of-turn token; not the generation prompt ("[CLS] the"), which the
    # prompt brings, nor the system's or the user's turns
    assert scored_runs(ids, labels, tokenizer) == ["superb and moving [SEP]", "boring [SEP]"]
    everything = encode([CONVERSATION], tokenizer, response_only_loss=False)
    assert everything["labels"][0] == everything["input_ids"][0] == ids


def test_sharegpt_conversations_read_as_messages(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    assert causal_lm.conversation(SHAREGPT, 1) == CONVERSATION
    assert encode([SHAREGPT], tokenizer) == encode([CONVERSATION], tokenizer)
    turns = causal_lm.assistant_turns(CONVERSATION)
    assert [(len(history), answer) for history, answer in turns] == [(2, "superb and moving"), (4, "boring")]


def test_truncation_keeps_labels_on_the_kept_tokens_and_leaves_out_unscored_conversations(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    whole = encode([CONVERSATION], tokenizer)
    cut = encode([CONVERSATION], tokenizer, max_length=14)
    assert cut["input_ids"][0] == whole["input_ids"][0][:14] and cut["labels"][0] == whole["labels"][0][:14]
    assert encode([CONVERSATION, CONVERSATION], tokenizer, max_length=8)["input_ids"] == []  # no answer within 8


def test_an_answer_that_merges_with_its_prompt_into_one_token_is_noticed(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    # the generation prompt ends inside a word: "[CLS] mov" + "ie" tokenizes as "movie", not as "mov" then "ie"
    tokenizer.chat_template = (
        "{% for m in messages %}[CLS] {% if m['role'] == 'assistant' %}mov{% endif %}{{ m['content'] }} [SEP] "
        "{% endfor %}{% if add_generation_prompt %}[CLS] mov{% endif %}"
    )
    messages = [{"role": "user", "content": "good"}, {"role": "assistant", "content": "ie"}]
    ids, answer, aligned = causal_lm.encode_chat(tokenizer, messages, 1)
    assert not aligned
    assert tokenizer.decode([t for t, a in zip(ids, answer) if a]) == "[SEP]"  # "movie" starts in the prompt
    assert causal_lm.encode_chat(tokenizer_of(tiny_llama), messages, 1)[2]


def chat_recipe(tmp_path, model, rows, **task) -> object:
    import yaml

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": r} if isinstance(r, list) else r) + "\n" for r in rows))
    recipe = {
        "model": {"name": str(model)},
        "data": {"source": str(data)},
        "task": {"type": "causal_lm", "max_length": 48, **task},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "train": {"batch_size": 8, "lr": 2e-2, "max_steps": 6},
        "export": {"output_dir": str(tmp_path / "runs" / "{name}")},
    }
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def conversations(n: int) -> list[list[dict]]:
    words = "good great fine superb bad awful poor dull".split()
    return [
        [
            {"role": "user", "content": f"was the movie {words[i % 8]}"},
            {"role": "assistant", "content": "good" if i % 8 < 4 else "bad"},
            {"role": "user", "content": "and the plot"},
            {"role": "assistant", "content": words[(i + 1) % 8]},
        ]
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def no_template(tiny_llama, tmp_path_factory):
    """The tiny Llama with a tokenizer that has no chat template."""
    folder = tmp_path_factory.mktemp("models") / "no-template"
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_of(folder).chat_template is None
    return folder


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"role": "tool", "content": "x"}, "source row 3, message 2: unknown role 'tool'"),
        ({"from": "observation", "value": "x"}, "source row 3, message 2: unknown role 'observation'"),
        (None, "source row 3: the conversation has no assistant message"),
        ("empty", "source row 3: the conversation is empty"),
        ({"role": "assistant", "content": None}, "source row 3, message 2 (assistant): its content is missing"),
    ],
)
def test_broken_conversations_fail_naming_the_row(tmp_path, tiny_llama, bad, message):
    rows = conversations(20)
    rows[2] = [] if bad == "empty" else [rows[2][0]] + ([bad] if bad else [])
    result = peftkit_here("run", chat_recipe(tmp_path, tiny_llama, rows))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_tokenizer_without_a_template_is_told_to_use_task_chat_template(tmp_path, no_template):
    result = peftkit_here("run", chat_recipe(tmp_path, no_template, conversations(20)))
    assert result.returncode == 2
    assert "has no chat template" in result.stderr and "task.chat_template" in result.stderr


def test_packing_refuses_methods_that_drop_position_ids(tmp_path, tiny_llama):
    import yaml

    from peftkit.errors import UserError

    raw = yaml.safe_load(chat_recipe(tmp_path, tiny_llama, conversations(4), packing=True).read_text())
    raw["method"], raw["name"] = {"name": "prompt_tuning"}, "chat"
    with pytest.raises(UserError, match="task.packing does not work with method prompt_tuning"):
        validate(raw)


@pytest.mark.parametrize("given", ["inline", "file"])
def test_a_given_template_trains_a_packed_chat_run_and_predict_answers_a_conversation(tmp_path, no_template, given):
    template = CHAT
    if given == "file":
        (tmp_path / "chat.jinja").write_text(CHAT)
        template = str(tmp_path / "chat.jinja")
    rows = conversations(40)
    if given == "file":  # and ShareGPT's conversations column
        rows = [{"conversations": [{"from": sharegpt_role(m["role"]), "value": m["content"]} for m in r]} for r in rows]
    result = peftkit_here(
        "run", chat_recipe(tmp_path, no_template, rows, packing=True, chat_template=template), "--overwrite"
    )
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "chat"
    assert tokenizer_of(run_dir / "adapter").chat_template == CHAT  # saved with the adapter
    history = json.dumps(CONVERSATION[:2])
    result = peftkit_here("predict", run_dir, "was the movie good", history)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("generated") == 1 and "was the movie good" in result.stdout


# --- packing ---------------------------------------------------------------------------------------------------


def tiny_decoder(arch: str, attn: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                            eos_token_id=0)  # fmt: skip
        return GPT2LMHeadModel._from_config(config, attn_implementation=attn).eval()
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()


def documents() -> tuple[list[list[int]], list[list[int]]]:
    """Documents of mixed lengths; some have their first half left out of the loss, as prompts are."""
    generator = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 40, (n,), generator=generator).tolist() for n in (5, 9, 3, 12, 7, 4, 16, 2)]
    labels = [[-100] * (len(d) // 2) + d[len(d) // 2 :] if i % 2 else list(d) for i, d in enumerate(ids)]
    return ids, labels


def batch_of(rows: dict, left: bool = False) -> dict:
    return packing.collate([dict(zip(rows, values)) for values in zip(*rows.values())], pad_id=0, left=left)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "fast-dropout sdpa"])
@pytest.mark.parametrize("chunk", [False, True])
def test_a_packed_batch_scores_as_its_documents_one_by_one(arch, attn, chunk):
    model = tiny_decoder(arch, attn.split()[-1])
    if attn.startswith("fast-dropout"):  # peftkit's registered attention function gets the packed mask too
        assert "->" in dropout.wrap_attention(model)
    ids, labels = documents()
    packed = packing.pack(ids, labels, 16, chunk=chunk)
    assert len(packed["input_ids"]) < len(ids) and max(map(len, packed["input_ids"])) <= 16
    total, count = torch.tensor(0.0), 0
    if chunk:  # a document cut at a row's end continues as a document of its own
        ids, labels = [], []
        for row_ids, row_labels, positions in zip(*packed.values()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            ids += [row_ids[a:b] for a, b in zip(starts, starts[1:])]
            labels += [row_labels[a:b] for a, b in zip(starts, starts[1:])]
    with torch.no_grad():
        for doc, label in zip(ids, labels):
            scored = sum(1 for x in label[1:] if x != -100)
            if scored:
                total += model(input_ids=torch.tensor([doc]), labels=torch.tensor([label])).loss * scored
                count += scored
        for left in (False, True):
            batch = batch_of(packed, left)
            loss = model(**batch).loss
            assert loss.item() == pytest.approx((total / count).item(), abs=1e-5), left
            assert int((batch["labels"][:, 1:] != -100).sum()) == count


def test_no_label_crosses_a_document_boundary(tiny_llama):
    tokenizer = tokenizer_of(tiny_llama)
    rows = conversations(30)
    unpacked = encode(rows, tokenizer, max_length=40)
    packed = encode(rows, tokenizer, max_length=40, packing=True)
    assert len(packed["input_ids"]) < len(rows) and "attention_mask" not in packed
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        assert len(ids) <= 40 and positions[0] == 0
        for i, p in enumerate(positions):
            if p == 0:  # a document starts: not predicted from the one before
                assert labels[i] == -100
            else:
                assert p == positions[i - 1] + 1
    # the same tokens, the same scored tokens: nothing lost, nothing gained
    assert sorted(t for r in packed["input_ids"] for t in r) == sorted(t for r in unpacked["input_ids"] for t in r)
    assert sum(x != -100 for r in packed["labels"] for x in r) == sum(x != -100 for r in unpacked["labels"] for x in r)


def test_a_resumed_packed_chat_run_ends_as_the_uninterrupted_one(tmp_path, tiny_llama):
    import yaml

    path = chat_recipe(tmp_path, tiny_llama, conversations(60), packing=True)
    raw = yaml.safe_load(path.read_text())
    raw["method"]["dropout"] = 0.1
    raw["train"] = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2, "keep_checkpoints": 9}
    path.write_text(yaml.safe_dump(raw))
    whole = job_for(path, tmp_path / "whole")
    expected = train.fit(whole)
    kept = sorted((tmp_path / "whole" / "checkpoints").glob("step-*"), key=lambda k: int(k.name.split("-")[1]))
    again = job_for(path)
    result = train.fit(again, resume=kept[1])
    assert result["history"] == expected["history"] and result["steps"] == expected["steps"]
    assert same(trainable_tensors(again.model), trainable_tensors(whole.model))
