"""Request and response bodies of the knowledge-probe HTTP API (``/v1``). Unknown fields are refused
(HTTP 422 naming them), so a typo never silently changes what is asked; types are strict (``true`` is not
a beam count, ``3`` is not a mention)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerationOptions(_Strict):
    max_new_tokens: Optional[int] = Field(None, ge=1, description="tokens to generate (server limit applies)")
    num_beams: Optional[int] = Field(None, ge=1, description="beam search width (server limit applies)")
    stream: bool = Field(False, description="answer as server-sent events: 'delta' events ({field: text}) as "
                                            "tokens come (beam search: at the end), then 'done' with the whole "
                                            "answer, or 'error'")


class MentionInContext(_Strict):
    text: Optional[str] = Field(None, description="text with the mention marked as <ent>...</ent>")
    left: Optional[str] = Field(None, description="text before the mention (with mention/right)")
    mention: Optional[str] = Field(None, description="the entity mention")
    right: Optional[str] = Field(None, description="text after the mention")


class DescribeRequest(MentionInContext, GenerationOptions):
    pass


FinishReason = Literal["stop", "length"]
MEAN_LOGPROB = Field(description="mean log-probability of the generated tokens (the same quantity for greedy "
                                 "and beam search)")
FINISH = Field(description="'stop': the answer ended itself; 'length': max_new_tokens (or the model's positions) cut it")


class DescribeResponse(BaseModel):
    title: str
    description: str
    mean_logprob: float = MEAN_LOGPROB
    finish_reason: FinishReason = FINISH


class Candidate(_Strict):
    title: str = Field(min_length=1)
    description: str = ""


class DisambiguateRequest(MentionInContext):
    candidates: list[Candidate] = Field(min_length=1)


class RankedCandidate(BaseModel):
    title: str
    description: str
    mean_logprob: float = Field(description="mean log-probability per token of 'Title<sep>description</ent_desc>'")
    logprob: float = Field(description="total log-probability")
    rank: int


class DisambiguateResponse(BaseModel):
    ranking: list[RankedCandidate]


class AppositiveRequest(GenerationOptions):
    text: str = Field(description="text holding the slot marker <appos> once")
    mention: str = Field(min_length=1, description="the entity; its last occurrence before the slot is used")


class AppositiveResponse(BaseModel):
    appositive: str
    title: str
    mean_logprob: float = MEAN_LOGPROB
    finish_reason: FinishReason = FINISH


class QARequest(GenerationOptions):
    question: str = Field(min_length=1)


class QAResponse(BaseModel):
    answer: str
    mean_logprob: float = MEAN_LOGPROB
    finish_reason: FinishReason = FINISH


class FillRequest(GenerationOptions):
    text: str = Field(description="text with one or more <mask>")


class FillResponse(BaseModel):
    text: str
    mean_logprob: float = MEAN_LOGPROB
    finish_reason: FinishReason = FINISH
