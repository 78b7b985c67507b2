"""The preference axes preference data is built on: opposed pairs of preference texts.

Each axis has two sides; a pair's rows carry the side's preference *text* (what the PersRM is
trained and evaluated with). Sampling adds a stronger *instruction* per side, because small
models ignore a mild one. The P-Soups axes (P1-P3) and PAD's helpful / humor come first, then
free-text axes so a PersRM learns to read a preference instead of memorising six. Axes in
:data:`HELD_OUT_AXES` are built (for the unseen-preference test) but must never be trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from padlm.core.preferences import PAD_DIMENSIONS, PSOUPS
from padlm.errors import PadlmError


@dataclass(frozen=True)
class Side:
    """One side of an axis: its id, the preference text rows carry, the sampling instruction."""

    id: str
    text: str
    instruction: str


@dataclass(frozen=True)
class Axis:
    """An opposed pair of sides; both directions are emitted as rows."""

    name: str
    a: Side
    b: Side

    def other(self, side_id: str) -> Side:
        return self.b if side_id == self.a.id else self.a



def _free(side_id: str, text: str, instruction: str) -> Side:
    return Side(side_id, f"Generate a response that is {text}.", instruction)


AXES: dict[str, Axis] = {axis.name: axis for axis in (
    Axis("P1",
         Side("P1A", PSOUPS["P1A"], "Use only short, simple, everyday words and short "
               "sentences, as if talking to a seven-year-old."),
         Side("P1B", PSOUPS["P1B"], "Write for specialists: dense technical terminology, "
               "precise jargon, long complex sentences, and never explain basic terms.")),
    Axis("P2",
         Side("P2A", PSOUPS["P2A"], "Answer in one or two short sentences only."),
         Side("P2B", PSOUPS["P2B"], "Write a long, detailed answer that explains the "
               "background step by step.")),
    Axis("P3",
         Side("P3A", PSOUPS["P3A"], "Be warm and cheerful, joke around and use playful, "
               "funny language."),
         Side("P3B", PSOUPS["P3B"], "Be curt, cold, impatient and dismissive, like a grumpy "
               "expert annoyed at being asked. Keep the facts correct. Never apologise.")),
    Axis("helpful",
         Side("helpful", PAD_DIMENSIONS["helpful"], "Give a complete, correct and specific "
               "answer."),
         Side("unhelpful", "Generate a response that is unhelpful: vague, evasive and "
               "missing the point.", "Do not really answer: stay vague and change the "
               "subject.")),
    Axis("humor",
         Side("humor", PAD_DIMENSIONS["humor"], "Make a joke or a funny remark in your "
               "answer."),
         Side("serious", "Generate a response that is serious, dry and formal, with no jokes "
               "at all.", "Stay strictly factual; no jokes.")),
    Axis("register",
         _free("formal", "formal and professional in tone", "Use a formal, polished, "
               "professional register, as in an official letter. No contractions, no slang."),
         _free("casual", "casual and conversational", "Talk casually, like chatting with a "
               "friend: contractions, everyday phrases, a relaxed tone.")),
    Axis("format",
         _free("bullets", "formatted as a bulleted list", "Format the whole answer as a "
               "bulleted list: every point on its own line starting with '- '."),
         _free("prose", "written as flowing prose paragraphs, with no lists",
               "Write connected paragraphs of prose. No lists, no bullet points, no "
               "headings.")),
    Axis("example",
         _free("example", "built around a concrete worked example", "Explain through one "
               "concrete, worked example with specific details or numbers."),
         _free("abstract", "general and abstract, with no examples", "Stay general and "
               "abstract: state the principles only and give no examples.")),
    Axis("outlook",
         _free("optimistic", "upbeat and optimistic", "Be upbeat and optimistic: stress "
               "what can go well and the opportunities."),
         _free("cautious", "cautious, pointing out risks and caveats", "Be cautious: point "
               "out the risks, caveats and what could go wrong.")),
    Axis("confidence",
         _free("confident", "confident and direct, with no hedging", "State everything "
               "confidently and directly; never hedge or qualify."),
         _free("hedged", "tentative, hedged with qualifiers", "Be tentative: hedge with "
               "words such as 'might', 'perhaps', 'it seems' and 'possibly'.")),
    Axis("energy",
         _free("enthusiastic", "enthusiastic and energetic", "Sound excited and energetic, "
               "with exclamation marks and lively words!"),
         _free("calm", "calm, measured and understated", "Sound calm, measured and "
               "understated; no exclamation marks.")),
    Axis("analogy",
         _free("analogy", "explained through an analogy", "Explain by comparing it to "
               "something familiar from everyday life: an analogy or metaphor."),
         _free("literal", "literal and direct, with no analogies or metaphors", "Be literal: "
               "describe things exactly as they are, with no analogies or metaphors.")),
    Axis("voice",
         _free("personal", "written in the first person, from a personal perspective",
               "Write in the first person ('I', 'in my experience') and share a personal "
               "perspective."),
         _free("impersonal", "impersonal and objective, never using 'I'", "Write in an "
               "impersonal, objective voice; never use 'I' or 'me'.")),
    # held out of training: the unseen-preference test (P-Soups' annotation styles)
    Axis("sassy",
         _free("sassy", "sassy: cheeky, bold and full of attitude", "Be sassy: cheeky, "
               "bold, a little teasing, full of attitude, while still answering."),
         _free("earnest", "earnest and plain, with no attitude", "Be earnest and plain: "
               "sincere, straightforward, no attitude or teasing.")),
    Axis("sarcastic",
         _free("sarcastic", "sarcastic", "Be sarcastic: say the opposite of what you mean, "
               "with mock praise and ironic remarks, while still answering."),
         _free("sincere", "sincere, meaning exactly what it says", "Be sincere: mean "
               "exactly what you say; no irony or sarcasm.")),
)}

HELD_OUT_AXES = ("sassy", "sarcastic")
HARMLESS = "harmless"  # real human pairs (HH-RLHF), not generated
DEFAULT_AXES = (*AXES, HARMLESS)
SIDES: dict[str, Side] = {side.id: side for axis in AXES.values() for side in (axis.a, axis.b)}
HELD_OUT_DIMENSIONS = tuple(side for name in HELD_OUT_AXES
                            for side in (AXES[name].a.id, AXES[name].b.id))


def check_axes(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [name for name in names if name not in DEFAULT_AXES]
    if unknown or not names:
        raise PadlmError(f"unknown axis {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(DEFAULT_AXES)}")
    return names


def generation_text(side_id: str) -> str:
    """What the sampler is told: the preference text, then the stronger instruction."""
    side = SIDES[side_id]
    return f"{side.text} {side.instruction}"
