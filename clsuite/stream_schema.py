"""Strict schemas of stream YAML files: a misspelt or mistyped key is refused at load time, never ignored."""
from __future__ import annotations

import string
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from .config import EvalConfig, TrainConfig
from .lm_eval_probe import LmEvalSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _block(cls: type[BaseModel]) -> type[BaseModel]:
    """``cls``'s fields (names, types, bounds) without its cross-field checks: a stream's block may be partial,
    and the CLI may still override the other fields (``clsuite.config.resolve_config`` checks the whole)."""
    fields = {k: (f.annotation, f) for k, f in cls.model_fields.items()}
    return create_model(f"{cls.__name__}Block", __config__=cls.model_config, __doc__=cls.__doc__, **fields)


TrainBlock = _block(TrainConfig)
EvalBlock = _block(EvalConfig)


def _one_line(name: str) -> str:
    if name.splitlines() != [name]:
        raise ValueError(f"must be a one-line string, got {name!r:.60}")
    return name


def _template(tmpl: str) -> str:
    """A ``str.format`` template whose fields are plain column names."""
    try:
        fields = list(string.Formatter().parse(tmpl))
    except ValueError as e:  # a lone brace
        raise ValueError(f"template {tmpl!r:.80} is malformed ({e}); write {{{{ for a literal brace") from None
    for _, fld, spec, conv in fields:
        if fld is not None and (not fld.isidentifier() or spec or conv):
            raise ValueError(f"template {tmpl!r:.80}: field {fld!r} must be a plain column name "
                             "(no attribute, index, conversion or format spec)")
    return tmpl


OneLine = Annotated[str, AfterValidator(_one_line)]
Template = Annotated[str, AfterValidator(_template)]


class SourceSpec(BaseModel):
    """``source:``: ``{builder: NAME, ...}`` (the builder's arguments, checked against its signature when it is
    called) or ``datasets.load_dataset`` arguments, which must include ``path``."""
    model_config = ConfigDict(extra="allow", strict=True)
    builder: str | None = Field(None, min_length=1, description="a registered data builder, as `clsuite list` shows")

    @model_validator(mode="after")
    def _one_form(self) -> "SourceSpec":
        if self.builder is None:
            path = self.arguments().get("path")
            if path is None:
                raise ValueError("names neither 'builder:' (a data builder and its arguments) nor 'path:' "
                                 "(datasets.load_dataset arguments); give one of them")
            if not isinstance(path, str) or not path:
                raise ValueError(f"'path:' must name a hub dataset or a format such as json, got {path!r:.60}")
        return self

    def arguments(self) -> dict[str, Any]:
        """The builder's arguments (``builder:`` form) or every ``load_dataset`` argument, path included."""
        return dict(self.model_extra or {})


class DataSpec(_Strict):
    """Where rows come from and how they are split and formatted (``general_data:``, and the base of a task)."""
    source: SourceSpec = Field(description="{builder: NAME, ...builder arguments} or datasets.load_dataset "
                                           "arguments with path:")
    train_split: str = "train"
    eval_split: str = "eval"
    eval_size: Any = Field(0.2, description="held out when the source has no eval split: a fraction or a row count")
    prompt: Template | None = Field(None, description="template of the prompt, e.g. '{question}'")
    target: Template | None = Field(None, description="template of the target, e.g. '{answer}'")
    choices: str | None = Field(None, description="a list column of answer choices (with answer:)")
    answer: str | None = Field(None, description="an integer column indexing choices:")

    @field_validator("eval_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int | float:
        return _size(v)

    @model_validator(mode="after")
    def _choices_with_answer(self) -> "DataSpec":
        if (self.choices is None) != (self.answer is None):
            raise ValueError("'choices:' (a list column) and 'answer:' (an integer column indexing it) go together")
        return self


def _size(v: Any) -> int | float:
    """A held-out size: a fraction in (0, 1) or a whole number of rows."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
            (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v < 1)):
        raise ValueError(f"give a fraction in (0, 1) or a whole number of rows (>= 1), got {v!r:.40}")
    return v


class TaskSpec(DataSpec):
    """A task or a probe read from its own data."""
    name: OneLine = Field(min_length=1, description="a name unique in the stream")
    scorer: str = Field(description="a registered scorer such as exact_match, loglik, multiple_choice")
    category: str = ""
    max_eval: int | None = Field(None, ge=1, description="first N eval rows scored (None: all)")
    chat_template: bool | None = Field(None, description="format prompts with the chat template; default: the "
                                                         "stream's chat_template")
    bos: bool | None = Field(None, description="scoring: the tokenizer's BOS before plain prompts (chat: false drops "
                                               "the template's leading BOS); default: the stream's bos")
    target_delimiter: str | None = Field(None, description="scoring: text between prompt and each target or choice "
                                                           "(lm-eval's is ' '); default: the stream's")
    val_split: str = Field("validation", description="the source's validation split, when it has one")
    val_size: Any = Field(None, description="validation rows held out when the source has no val_split: of the "
                                            "training rows for a task (default: as many as it has test rows), of the "
                                            "evaluation rows for a probe (default: none); a fraction or a row count")

    @field_validator("val_size", mode="before")
    @classmethod
    def _val_size(cls, v: Any) -> int | float | None:
        return None if v is None else _size(v)


class LmEvalProbeSpec(_Strict):
    """A probe scored by lm-evaluation-harness, which loads and scores its own data."""
    name: OneLine = Field(min_length=1, description="a name unique in the stream")
    category: str = ""
    lm_eval: LmEvalSpec


class StreamSpec(_Strict):
    """A stream file after ``include:`` merging; tasks and probes are validated one by one (TaskSpec,
    LmEvalProbeSpec) so that errors name them."""
    name: OneLine | None = Field(None, description="default: the file name without .yaml")
    description: str = ""
    include: Any = Field(None, description="files merged under this one (read before validation)")
    model: str = Field(min_length=1, description="a model id, path or registered model, as `clsuite list models` shows")
    chat_template: bool = False
    bos: bool = Field(True, description="default of the tasks' and probes' bos: (docs/lm-eval.md)")
    target_delimiter: str = Field("", description="default of the tasks' and probes' target_delimiter:")
    data_seed: int = Field(0, ge=0, le=2**32 - 1)
    train: TrainBlock | None = None  # type: ignore[valid-type]
    eval: EvalBlock | None = None  # type: ignore[valid-type]
    tasks: list[Any] | None = Field(None, description="a list of tasks: name, scorer, source, ...")
    probes: list[Any] | None = None
    general_data: DataSpec | None = None
    orders: list[list[OneLine]] | None = Field(None, description="task orders: a run with seed k trains the tasks in "
                                                          "orders[k mod len(orders)] (default: as listed)")
