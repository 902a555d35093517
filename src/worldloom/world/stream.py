"""The stream layout: how one episode becomes one sequence of tokens, and back.

An episode of T steps is laid out as

    <bos> mission words <sep> | obs_0 a_0 r_0 d_0 | obs_1 a_1 r_1 d_1 | ... | obs_{T-1} a_{T-1} r_{T-1} d_{T-1}

where ``obs_t`` is the observation tokenizer's tokens (any ``worldloom.tokenize.ObsTokenizer``, the
one the environment adapter declares; 50 for a MiniGrid view: 49 cells and the direction), ``a_t`` the action, ``r_t`` the reward (binned) and ``d_t`` whether the step
ended the episode (continue / terminated / truncated). One step is ``step_len`` tokens.

A layout built with an audio tokenizer (a run with ``stream.spoken`` > 0, worldloom.audio.spoken)
can also lay the mission out as speech: ``prefix(mission, voice)`` is ``<bos> audio codes <sep>``,
the codes of that voice's speech of the mission. The codes own the last slice of the vocabulary,
after ``done``, so a layout without audio has exactly the ids it always had.

Reading the stream left to right, the same next-token prediction makes the model

* a **policy** at the last token of ``obs_t`` (the next token is the action ``a_t``), and
* a **world model** after ``a_t`` (the next tokens are ``r_t``, ``d_t`` and then ``obs_{t+1}``).

Every modality owns a slice of the joint vocabulary (``offset[kind]``); nothing outside this
module knows the offsets. Each position also has a *slot* (0 for mission tokens, then 1 ..
step_len for the positions of a step), which the model embeds so that it knows which cell
it is reading or predicting, and a *kind*, which selects its loss weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import StreamConfig
from ..errors import CheckpointError
from ..io import read_json, write_json
from ..tokenize import ObsTokenizer, ScalarBins, TextTokenizer, load_obs_tokenizer
from .places import place_rule

from ..modality import BOS, N_SPECIAL, PAD, SEP  # noqa: F401 - the special ids, shared with the model
KINDS = ("pad", "mission", "obs", "action", "reward", "done")
K_PAD, K_MISSION, K_OBS, K_ACTION, K_REWARD, K_DONE = range(len(KINDS))
DONE_CONTINUE, DONE_TERMINATED, DONE_TRUNCATED = range(3)


@dataclass
class EpisodeTokens:
    """One episode, tokenized once: the mission prefix and a (T, step_len) block of steps."""

    prefix: np.ndarray  # (P,) int64: <bos> mission <sep>
    steps: np.ndarray  # (T, step_len) int64
    policy: np.ndarray  # (T,) int64: the stream id of the action the policy should learn at step t, -1 = none

    @property
    def length(self) -> int:
        return len(self.steps)


class StreamLayout:
    def __init__(self, mission: TextTokenizer, obs: ObsTokenizer, n_actions: int, reward: ScalarBins, audio=None,
                 places: str = ""):
        self.mission, self.obs, self.n_actions, self.reward = mission, obs, n_actions, reward
        self.audio = audio  # an AudioTokenizer: missions may be heard (prefix(mission, voice)); None: words only
        self._heard: dict[tuple[str, object], np.ndarray] = {}  # (mission, voice) -> codes, each spoken once
        sizes = {"mission": mission.vocab_size, "obs": obs.vocab_size, "action": n_actions,
                 "reward": reward.vocab_size, "done": 3}
        if audio is not None:
            sizes["audio"] = audio.vocab_size  # appended last: every other slice keeps its ids
        self.offset, start = {}, N_SPECIAL
        for name, n in sizes.items():
            self.offset[name] = start
            start += n
        self.size = sizes
        self.vocab_size = start
        self.obs_len = obs.n_tokens
        self.step_len = self.obs_len + 3
        self.n_slots = self.step_len + 1  # slot 0 = mission and specials

        # per position within a step: kind, slot, and the [lo, hi) ids it may hold
        self.step_kinds = np.array([K_OBS] * self.obs_len + [K_ACTION, K_REWARD, K_DONE], dtype=np.int64)
        self.step_slots = np.arange(1, self.step_len + 1, dtype=np.int64)
        o = self.offset
        ranges = [(lo + o["obs"], hi + o["obs"]) for lo, hi in obs.token_ranges()]
        ranges += [(o["action"], o["action"] + n_actions), (o["reward"], o["reward"] + reward.vocab_size), (o["done"], o["done"] + 3)]
        self.step_ranges = np.array(ranges, dtype=np.int64)  # (step_len, 2)
        self.places = places  # the place rule the step-skip input of observation cells follows ("" = the same cell)
        self.place_rule = place_rule(places, obs, o["obs"], o["action"]) if places else None

    def slots_at(self, start: int, n: int) -> np.ndarray:
        """The slots of n consecutive step positions, the first at position ``start`` of the steps."""
        return self.step_slots[(start + np.arange(n)) % self.step_len]

    def kinds_at(self, start: int, n: int) -> np.ndarray:
        """The kinds (K_*) of n consecutive step positions, the first at position ``start`` of the steps."""
        return self.step_kinds[(start + np.arange(n)) % self.step_len]

    def step_skip(self, steps: np.ndarray, remembered: np.ndarray | None = None) -> np.ndarray:
        """Step ids (B, n), the first a frame's first token -> the step-skip ids of those positions (B, n), aligned
        with them as inputs: position k gets the id at k + 1 - step_len (its target's counterpart one step earlier,
        0 when that is before the first step); with a place rule, a position whose target is a cell of a later
        frame gets instead the last id seen at the place that cell shows (worldloom.world.places). ``remembered``:
        the rule's output for these steps or a prefix of them that reaches every action in them (a cache)."""
        B, n = steps.shape
        out = np.zeros((B, n), np.int64)
        src = np.arange(n) + 1 - self.step_len
        ok = src >= 0
        out[:, ok] = steps[:, src[ok]]
        if self.place_rule is not None:
            rem = self.place_rule.remembered(steps, self.step_len) if remembered is None else remembered
            if rem.shape[1] < n + 1:
                rem = np.pad(rem, ((0, 0), (0, n + 1 - rem.shape[1])))
            q = np.arange(1, n + 1)
            cell = (q >= self.step_len) & (q % self.step_len < self.place_rule.cells)
            out[:, cell] = rem[:, 1 : n + 1][:, cell]
        return out

    def skip_ids(self, seq: np.ndarray, P: int, before: np.ndarray | None = None) -> np.ndarray:
        """``step_skip`` of one segment (a prefix of P tokens, then steps), for every position of it (the prefix's 0).
        ``before``: the episode's step ids before the segment's first step (a later window of a long episode, whole
        steps). With a place rule the skip ids read them too (what was seen before the window, as the runner keeps
        it past a roll-over); without one they are ignored (the plain skip stays inside the window)."""
        out = np.zeros(len(seq), np.int64)
        steps = np.asarray(seq[P:], np.int64)
        before = None if before is None else np.asarray(before, np.int64).reshape(-1)  # (steps, step_len) or flat
        if self.place_rule is not None and before is not None and len(before):
            d = len(before)
            out[P:] = self.step_skip(np.concatenate([before, steps])[None])[0][d:]
        else:
            out[P:] = self.step_skip(steps[None])[0]
        return out

    def name_attributes(self, object_names: dict[int, str], color_names: dict[int, str]) -> np.ndarray:
        """(vocab_size, 2) the attributes (1-based; 0 = none) each id shows or names, for stream.names and stream.match: a grid cell
        shows its object (1 .. n_objects) and its colour (n_objects + 1 ..); a mission word that is one of those
        names (the environment's own, e.g. MiniGrid's "ball", "red") names it."""
        obs = self.obs
        if not all(hasattr(obs, k) for k in ("n_objects", "n_colors", "n_states", "n_cell_codes")):
            raise ValueError(f"stream.names and stream.match tie mission words to the attributes of grid cells; the {obs.kind} tokenizer has none")
        out = np.zeros((self.vocab_size, 2), np.int64)
        code = np.arange(obs.n_cell_codes)
        out[self.offset["obs"] + code, 0] = code // (obs.n_colors * obs.n_states) + 1
        out[self.offset["obs"] + code, 1] = obs.n_objects + (code // obs.n_states) % obs.n_colors + 1
        vocab = self.mission.tok.get_vocab()
        for attr, names in ((0, object_names), (1, color_names)):
            for index, name in names.items():
                word = vocab.get(str(name))
                if word is not None and word > 0 and 0 <= index < (obs.n_objects if attr == 0 else obs.n_colors):
                    out[self.offset["mission"] + word, 0] = index + 1 + (obs.n_objects if attr else 0)
        return out

    @classmethod
    def build(cls, missions: list[str], n_actions: int, cfg: StreamConfig, obs: ObsTokenizer, audio=None,
              places: str = "") -> "StreamLayout":
        """A layout for a new run: the mission vocabulary is learned from the training missions; ``obs``
        is the observation tokenizer the environment adapter declares (``adapter.obs_tokenizer(meta)``);
        ``audio`` an audio tokenizer for spoken missions (stream.spoken > 0), or None; ``places`` the adapter's
        place rule when stream.places is on."""
        return cls(TextTokenizer.train("word", "\n".join(missions) or "mission"), obs, n_actions,
                   ScalarBins(cfg.reward_bins, lo=cfg.reward_lo), audio, places)

    # -- encoding
    def prefix(self, mission: str, voice=None) -> np.ndarray:
        """``<bos> mission words <sep>``; with a ``voice`` (worldloom.audio.speech.Voice), ``<bos> codes <sep>``:
        the audio tokens of that voice speaking the mission."""
        if voice is not None and mission.strip():  # an environment without missions has nothing to speak
            return np.concatenate([[BOS], self.heard(mission, voice) + self.offset["audio"], [SEP]]).astype(np.int64)
        words = self.mission.encode(mission).numpy() + self.offset["mission"] if mission.strip() else np.zeros(0, np.int64)
        return np.concatenate([[BOS], words, [SEP]]).astype(np.int64)

    def heard(self, mission: str, voice) -> np.ndarray:
        """The audio tokenizer's codes (n,) of ``voice`` speaking ``mission`` (espeak-ng; each pair spoken once)."""
        if self.audio is None:
            raise ValueError("this stream layout has no audio tokens: its run was trained without spoken missions "
                             "(stream.spoken=0)")
        key = (mission, voice)
        if key not in self._heard:
            from ..audio.spoken import mission_codes

            self._heard[key] = mission_codes(self.audio, mission, voice)
        return self._heard[key]

    def encode_obs(self, fields: dict) -> np.ndarray:
        """Batched observation fields (as the env adapter names them, leading axis N) -> (N, obs_len) ids."""
        missing = [k for k in self.obs.fields if k not in fields]
        if missing:
            raise ValueError(f"observation fields {missing} missing (the {self.obs.kind} tokenizer reads "
                             f"{', '.join(self.obs.fields)}; got {', '.join(fields) or 'none'})")
        return self.obs.encode_batch(fields) + self.offset["obs"]

    def action_ids(self, action) -> np.ndarray:
        return np.asarray(action, dtype=np.int64) + self.offset["action"]

    def reward_ids(self, reward) -> np.ndarray:
        return self.reward.encode_batch(reward) + self.offset["reward"]

    def done_ids(self, terminated, truncated) -> np.ndarray:
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        code = np.where(terminated, DONE_TERMINATED, np.where(truncated, DONE_TRUNCATED, DONE_CONTINUE))
        return code.astype(np.int64) + self.offset["done"]

    def episode(self, ep, voice=None) -> EpisodeTokens:
        """An Episode (worldloom.world.data.episodes) -> its tokens (its mission heard in ``voice``, if given).
        The final observation o_T is not in the stream: after the last ``done`` token the episode is over."""
        T = ep.length
        obs = self.encode_obs({k: v[:T] for k, v in ep.obs.items()})  # (T, obs_len)
        term = np.zeros(T, bool)
        trunc = np.zeros(T, bool)
        if T:
            term[-1], trunc[-1] = ep.terminated, ep.truncated and not ep.terminated
        steps = np.concatenate([obs, self.action_ids(ep.action)[:, None], self.reward_ids(ep.reward)[:, None],
                                self.done_ids(term, trunc)[:, None]], axis=1)
        label = ep.policy_label
        policy = np.where(label >= 0, self.action_ids(np.maximum(label, 0)), -1)
        return EpisodeTokens(self.prefix(ep.mission, voice), steps, policy)

    # -- decoding
    def decode_obs(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """(N, obs_len) stream ids -> batched observation fields (leading axis N)."""
        return self.obs.decode_batch(np.asarray(ids) - self.offset["obs"])

    def decode_action(self, ids) -> np.ndarray:
        return np.clip(np.asarray(ids) - self.offset["action"], 0, self.n_actions - 1)

    def decode_reward(self, ids) -> np.ndarray:
        return self.reward.decode_batch(np.asarray(ids) - self.offset["reward"])

    def decode_done(self, ids) -> tuple[np.ndarray, np.ndarray]:
        code = np.asarray(ids) - self.offset["done"]
        return code == DONE_TERMINATED, code == DONE_TRUNCATED

    def mask_frame(self, logits):
        """Frame logits (..., obs_len, V) (a torch tensor) with every id a position may not hold at -inf."""
        from ..inference.sampling import restrict

        return restrict(logits, self.step_ranges[: self.obs_len])  # one (lo, hi) per position

    def kinds_of(self, ids: np.ndarray) -> np.ndarray:
        """The kind (K_*) of every stream id, from its vocabulary slice."""
        ids = np.asarray(ids)
        kinds = np.full(ids.shape, K_PAD, dtype=np.int64)
        kinds[(ids == BOS) | (ids == SEP)] = K_MISSION
        for name, k in (("mission", K_MISSION), ("obs", K_OBS), ("action", K_ACTION), ("reward", K_REWARD), ("done", K_DONE),
                        ("audio", K_MISSION)):
            if name not in self.offset:
                continue
            lo = self.offset[name]
            kinds[(ids >= lo) & (ids < lo + self.size[name])] = k
        return kinds

    # -- persistence (the run folder's stream/ directory: stream.json records the observation tokenizer's
    # kind, which its own files beside it (grid_tokenizer.json for a grid) are loaded by; a layout with spoken
    # missions also records "audio_tokenizer": its kind, whose files (audio_tokenizer.*) lie in the same folder)
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        self.mission.save(folder / "mission")
        self.obs.save(folder)
        if self.audio is not None:
            self.audio.save(folder)
        write_json(folder / "stream.json", {"n_actions": self.n_actions, "reward_bins": self.reward.n_bins,
                                            "reward_hi": self.reward.hi, "vocab_size": self.vocab_size, "obs_tokenizer": self.obs.kind,
                                            **({"reward_lo": self.reward.lo} if self.reward.lo else {}),
                                            **({"places": self.places} if self.places else {}),
                                            **({"audio_tokenizer": self.audio.kind} if self.audio is not None else {})})

    @classmethod
    def load(cls, folder: Path) -> "StreamLayout":
        folder = Path(folder)
        meta = read_json(folder / "stream.json", "stream layout")
        kind = meta.get("obs_tokenizer", "grid")  # folders written before the key existed hold a grid tokenizer
        obs = load_obs_tokenizer(str(kind), folder)
        audio = load_obs_tokenizer(str(meta["audio_tokenizer"]), folder) if meta.get("audio_tokenizer") else None
        try:
            layout = cls(TextTokenizer.load(folder / "mission"), obs, int(meta["n_actions"]),
                         ScalarBins(int(meta["reward_bins"]), float(meta["reward_hi"]), float(meta.get("reward_lo", 0.0))), audio,
                         str(meta.get("places", "")))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"stream layout {folder / 'stream.json'} is incomplete; the run folder is damaged") from None
        if layout.vocab_size != meta.get("vocab_size"):
            raise CheckpointError(f"stream layout in {folder} gives {layout.vocab_size} tokens, but it recorded {meta.get('vocab_size')}")
        return layout

