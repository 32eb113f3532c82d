"""What a client trains and evaluates: the two task kinds of docs/ARCHITECTURE.md §3.

``ClassifyTask`` (the embedded default): a sentence encoder (MiniLM) embeds the text (masked
mean pooling, L2-normalised) and each candidate label name; the logits are the cosines over a
temperature, restricted to the example's ``choices``; cross-entropy trains the adapters. The
label-name embeddings come from the *base* encoder (both adapters at weight 0), computed once
per label set: the adapters learn to move texts towards their label, and an example's label
space does not depend on which adapter mix is evaluating it.

``CausalLMTask``: an instruction-tuned causal LM; the prompt is the Alpaca template (the paper's)
or, for a model with a chat template, that template with an empty system turn; the loss
covers the response tokens only (EOS appended; the LM head runs only where a response token is
predicted), prompts are truncated to ``cutoff`` tokens;
evaluation generates (greedy, or beam search with ``num_beams`` > 1: each sequence's beams keep
its own mix weights, feddpa_fast/rows.py) and scores ROUGE-L against the reference output.

Both expose the same methods, all taking per-sequence mix weights where it matters:
``loss(examples)``, ``predict(examples, global_w, local_w) -> list[str]``,
``score(examples, predictions) -> float`` and ``represent(examples, how) -> (B, H)`` (the hidden
state FedDPA's dynamic weighting compares).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from jinja2 import TemplateError

from ..mixing import mix

__all__ = ["ClassifyTask", "CausalLMTask", "PROMPT"]

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}"
          "### Response:\n")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the last real token (right padding) or the masked mean."""
    if how == "last":
        last = mask.sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"representation must be 'last' or 'mean', got {how!r}")


def _group_means(per_row: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [part.mean() for part in torch.split(per_row, sizes)]


def _padding(mask: torch.Tensor) -> float:
    """The fraction of a batch's token positions that are padding."""
    return 1.0 - float(mask.sum()) / max(mask.numel(), 1)


class ClassifyTask:
    """Text classification by matching text and label-name embeddings (see module docstring)."""

    kind = "classify"

    def __init__(self, model, tokenizer, *, max_length: int = 64, temperature: float = 0.05):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.temperature = max_length, temperature
        self._label_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def _encode(self, texts):
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.model.device) for k, v in batch.items()}

    def _embed(self, texts, how: str = "mean") -> torch.Tensor:
        batch = self._encode(texts)
        hidden = self.model(**batch).last_hidden_state.float()  # fp32 logits and loss
        return F.normalize(_pool(hidden, batch["attention_mask"], how), dim=-1)

    def label_embeddings(self, choices: tuple[str, ...]) -> torch.Tensor:
        """(C, H) base-encoder embeddings of the label names, cached per label set."""
        if choices not in self._label_cache:
            was_training = self.model.training
            self.model.eval()  # deterministic: no dropout, whenever the first call happens
            try:
                with torch.no_grad(), mix(self.model, 0.0, 0.0):
                    self._label_cache[choices] = self._embed(choices)
            finally:
                self.model.train(was_training)
        return self._label_cache[choices]

    def _logits(self, examples, texts=None) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
        texts = self._embed([e.text for e in examples]) if texts is None else texts
        label_sets = sorted({e.choices for e in examples})
        width = max(len(c) for c in label_sets)
        logits = texts.new_full((len(examples), width), float("-inf"))
        for choices in label_sets:
            rows = [i for i, e in enumerate(examples) if e.choices == choices]
            sims = texts[rows] @ self.label_embeddings(choices).T
            logits[rows, : len(choices)] = sims / self.temperature
        return logits, [e.choices for e in examples]

    def loss(self, examples) -> torch.Tensor:
        """Mean cross-entropy over the examples' label choices (call inside ``mix``)."""
        logits, choices = self._logits(examples)
        target = torch.tensor([c.index(e.label) for c, e in zip(choices, examples)],
                              device=logits.device)
        return F.cross_entropy(logits, target)

    def row_lengths(self, examples) -> list[int]:
        """The tokens of each example's row in a training batch (before padding)."""
        ids = self.tokenizer([e.text for e in examples], truncation=True,
                             max_length=self.max_length)["input_ids"]
        return [len(row) for row in ids]

    def group_losses(self, groups) -> tuple[list[torch.Tensor], float]:
        """Each group's mean cross-entropy (``loss`` of the group alone) from one forward over
        every group's rows, and the pass's padding fraction (call inside ``mix``: the cohort,
        fed/cohort.py)."""
        examples = [e for g in groups for e in g]
        batch = self._encode([e.text for e in examples])
        hidden = self.model(**batch).last_hidden_state.float()
        texts = F.normalize(_pool(hidden, batch["attention_mask"], "mean"), dim=-1)
        logits, choices = self._logits(examples, texts)
        target = torch.tensor([c.index(e.label) for c, e in zip(choices, examples)],
                              device=logits.device)
        per_row = F.cross_entropy(logits, target, reduction="none")
        return _group_means(per_row, [len(g) for g in groups]), _padding(batch["attention_mask"])

    @torch.no_grad()
    def predict(self, examples, global_w, local_w, clients=None) -> list[str]:
        """The predicted label of each example under the mix (``clients``: one client name per
        example, ``mix``'s argument)."""
        with mix(self.model, global_w, local_w, clients):
            logits, choices = self._logits(examples)
        return [c[i] for c, i in zip(choices, logits.argmax(-1).tolist())]

    @staticmethod
    def score(examples, predictions) -> float:
        """Accuracy in [0, 1]."""
        return sum(p == e.label for p, e in zip(predictions, examples)) / max(len(examples), 1)

    @torch.no_grad()
    def represent(self, examples, how: str = "last") -> torch.Tensor:
        """Last-layer hidden state per example under the current mix (not normalised)."""
        batch = self._encode([e.text for e in examples])
        hidden = self.model(**batch).last_hidden_state.float()  # compared in fp32
        return _pool(hidden, batch["attention_mask"], how)


class CausalLMTask:
    """Instruction tuning of a causal LM; ROUGE-L of greedy generations (module docstring)."""

    kind = "causal-lm"

    def __init__(self, model, tokenizer, *, cutoff: int = 256, max_new_tokens: int = 32,
                 num_beams: int = 1, prompt_format: str = "alpaca", gather_answers: bool = True):
        """Args:
            cutoff: prompt (and answer) tokens kept.
            gather_answers: the LM head runs on the answer-predicting positions only (a
                forward pre-hook on the model's output embeddings); False runs it on the
                answer columns of every row (``logits_to_keep``), which a compiled model
                needs (no data-dependent shape inside its graph).
            max_new_tokens, num_beams: decoding of ``predict``.
            prompt_format: "alpaca", "chat" (the tokenizer's chat template, an empty system
                turn: SmolLM2's default system prompt would add 16 tokens to prompts of 25)
                or "auto" (chat when the tokenizer has a chat template).
        """
        for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CausalLMTask: {name} must be a positive int, got {value!r}")
        if prompt_format == "auto":
            prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
        if prompt_format not in ("alpaca", "chat"):
            raise ValueError(f"CausalLMTask: prompt_format must be auto, alpaca or chat, got "
                             f"{prompt_format!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("CausalLMTask: prompt_format 'chat' needs a tokenizer with a chat "
                             "template")
        self.model, self.tokenizer = model, tokenizer
        self.cutoff, self.max_new_tokens, self.num_beams = cutoff, max_new_tokens, num_beams
        self.prompt_format, self.gather_answers = prompt_format, gather_answers
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._scorer = None

    def _prompt_text(self, e) -> str:
        if self.prompt_format == "chat":
            user = {"role": "user", "content": e.instruction + (f"\n\n{e.input}" if e.input
                                                                 else "")}
            try:
                return self.tokenizer.apply_chat_template(
                    [{"role": "system", "content": ""}, user], tokenize=False,
                    add_generation_prompt=True)
            except TemplateError:  # a template that refuses a system turn (Gemma's raises)
                return self.tokenizer.apply_chat_template([user], tokenize=False,
                                                          add_generation_prompt=True)
        block = f"### Input:\n{e.input}\n\n" if e.input else ""
        return PROMPT.format(instruction=e.instruction, input_block=block)

    def _prompt_ids(self, e) -> list[int]:
        chat = self.prompt_format == "chat"  # the template writes its own special tokens
        ids = self.tokenizer(self._prompt_text(e), add_special_tokens=not chat)["input_ids"]
        return ids[-self.cutoff:]  # keep the end: "### Response:" must stay next to the answer

    def _training_batch(self, examples):
        """(ids, mask, labels, keep): prompt + answer (EOS appended) per row, right-padded;
        labels are -100 outside the answers. The answers of every row lie in the last
        ``keep - 1`` columns (``keep``: from the column before the shortest prompt's end)."""
        prompts = [self._prompt_ids(e) for e in examples]
        rows, labels = [], []
        for e, prompt in zip(examples, prompts):
            answer = self._answer_ids(e)
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)  # loss on the response only
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        keep = width - min(len(p) for p in prompts) + 1
        dev = self.model.device
        return ids.to(dev), mask.to(dev), lab.to(dev), keep

    def loss(self, examples) -> torch.Tensor:
        """Mean cross-entropy over the response tokens (call inside ``mix``). The LM head runs
        only where a response token is predicted (``_answer_logits``): for SmolLM2 it is
        49,152 x 576, the largest layer, and the prompts are most of each row. Right padding
        as before, so the rest of the model computes exactly what it did (bench/llm_step.py)."""
        if not examples:
            raise ValueError("CausalLMTask.loss: no examples")
        logits, targets, _, _ = self._answer_logits(examples)
        return F.cross_entropy(logits.float(), targets)

    def row_lengths(self, examples) -> list[int]:
        """The tokens of each example's training row (prompt, answer and EOS; before
        padding), as ``_training_batch`` builds it."""
        return [len(self._prompt_ids(e)) + len(self._answer_ids(e)) for e in examples]

    def _answer_ids(self, e) -> list[int]:
        answer = self.tokenizer(e.output, add_special_tokens=False)["input_ids"]
        return answer[: self.cutoff] + [self.tokenizer.eos_token_id]

    def group_losses(self, groups) -> tuple[list[torch.Tensor], float]:
        """Each group's mean cross-entropy over its response tokens (``loss`` of the group
        alone) from one forward over every group's rows, right-padded to the longest row of
        all, and the pass's padding fraction (call inside ``mix``: the cohort, fed/cohort.py)."""
        examples = [e for g in groups for e in g]
        if not examples:
            raise ValueError("CausalLMTask.group_losses: no examples")
        logits, targets, per_row, padding = self._answer_logits(examples)
        per_token = F.cross_entropy(logits.float(), targets, reduction="none")
        counts = [int(rows.sum()) for rows in per_row.split([len(g) for g in groups])]
        return _group_means(per_token, counts), padding

    def _answer_logits(self, examples):
        """(logits (N, vocab), targets (N,), response tokens per row (B,), padding fraction)
        over the N positions that predict a response token, row after row.

        Column j predicts token j + 1 and every response lies in the last ``keep - 1``
        columns, so the model's head runs on those (``logits_to_keep``); with
        ``gather_answers`` on their response positions only: a batch of 8 rows of the
        lexical suite keeps 18 columns per row (144 positions), of which 53 predict a
        response token (bench/README.md, "The causal-LM step")."""
        ids, mask, labels, keep = self._training_batch(examples)
        targets = labels[:, -keep + 1:]
        predicts = torch.cat([targets != -100, torch.zeros_like(targets[:, :1], dtype=torch.bool)],
                             dim=1)  # (B, keep): the last column predicts past the row
        answers = targets[predicts[:, :-1]]

        def answer_positions(_head, args):  # the head's input (B, >= keep, H) -> (N, H)
            return (args[0][:, -keep:][predicts], *args[1:])

        head = self.model.get_output_embeddings()
        hook = head.register_forward_pre_hook(answer_positions) if self.gather_answers else None
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        finally:
            if hook is not None:
                hook.remove()
        if not self.gather_answers:  # a model that ignores logits_to_keep returns every column
            logits = logits[:, -keep:][predicts]
        if logits.dim() != 2 or logits.shape[0] != answers.numel():
            raise RuntimeError(
                f"CausalLMTask: {type(self.model).__name__} did not compute its logits with its "
                f"output embeddings on the gathered positions (logits {tuple(logits.shape)}, "
                f"{answers.numel()} response tokens); build the task with gather_answers=False")
        return logits, answers, predicts.sum(1), _padding(mask)

    def _left_padded_prompts(self, examples):
        prompts = [self._prompt_ids(e) for e in examples]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return ids.to(self.model.device), mask.to(self.model.device)

    @torch.no_grad()
    def predict(self, examples, global_w, local_w, clients=None) -> list[str]:
        """Generations for ``examples`` under the mix (floats or one weight per example;
        ``clients``: one client name per example, ``mix``'s argument); one batched
        ``generate`` call, greedy or with ``num_beams`` beams."""
        ids, mask = self._left_padded_prompts(examples)
        with mix(self.model, global_w, local_w, clients):
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      num_beams=self.num_beams,
                                      max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    def score(self, examples, predictions) -> float:
        """Mean ROUGE-L F-measure in [0, 1] (the rouge-score package)."""
        if self._scorer is None:
            from rouge_score import rouge_scorer
            self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        scores = [self._scorer.score(e.output, p)["rougeL"].fmeasure
                  for e, p in zip(examples, predictions)]
        return sum(scores) / max(len(scores), 1)

    @torch.no_grad()
    def represent(self, examples, how: str = "last") -> torch.Tensor:
        """Last-layer hidden state of the prompt (right-aligned: the last token is real)."""
        ids, mask = self._left_padded_prompts(examples)
        # Positions count real tokens only, so a left-padded row sees what it sees alone.
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         output_hidden_states=True, logits_to_keep=1)  # no LM head over T
        hidden = out.hidden_states[-1].float()  # compared in fp32 whatever the base dtype
        if how == "last":
            return hidden[:, -1]  # left padding: the last position is the last real token
        return _pool(hidden, mask, how)
