"""Writes the demo sound-QA dataset in the original manifest format, from sounds made on this machine.

    python train/make_demo_data.py OUT [--train-per-task 600] [--test-per-task 60] [--seed 0]

OUT/manifests/Name-Task/{train,test}.json (Name-Task/split.json, as the original README) and OUT/audio/... (16 kHz
mono FLAC, each at most 3 s: one window of the demo model). Tasks: the pitch class of a sine tone, the number of beeps, the colour of a noise, a spoken digit
(espeak-ng with varied voice, speed and pitch), which recorded clip of the pygame-ce wheel is playing (varied gain,
speed and position), and the colour of the noise behind a tone (mixtures). The test split uses its own seeds, so no
clip is shared with training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile

RATE = 16000
# Every clip fits one window of the demo model (train/configs/demo.yaml: audio.window_seconds).
CLIP_SECONDS = 3.0
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PITCHES = {"low": (150, 300), "middle": (600, 1000), "high": (2500, 4000)}
CLIPS = {"boom.wav": "explosion", "car_door.wav": "car door", "punch.wav": "punch", "whiff.wav": "whoosh",
         "secosmic_lo.wav": "synth tone", "house_lo.wav": "music"}


def tone(rng, low, high, seconds):
    t = np.arange(int(seconds * RATE)) / RATE
    wave = np.sin(2 * np.pi * rng.uniform(low, high) * t)
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    return wave * fade * rng.uniform(0.3, 0.9)


def noise(rng, colour, seconds):
    n = int(seconds * RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / RATE)
    freqs[0] = freqs[1]
    spectrum *= {"white": 1.0, "pink": 1 / np.sqrt(freqs), "brown": 1 / freqs}[colour]
    wave = np.fft.irfft(spectrum, n)
    return wave / np.max(np.abs(wave)) * rng.uniform(0.3, 0.9)


def place(rng, sound, seconds=None):
    """The sound at a random offset inside a clip of `seconds` (default: the demo's window, CLIP_SECONDS)."""
    total = max(int((seconds or CLIP_SECONDS) * RATE), len(sound))
    out = np.zeros(total)
    start = rng.integers(0, total - len(sound) + 1)
    out[start: start + len(sound)] = sound
    return out


def pitch_item(rng, _):
    name = rng.choice(list(PITCHES))
    return place(rng, tone(rng, *PITCHES[name], rng.uniform(0.5, 2.0))), "is the tone low, middle or high?", name


def beeps_item(rng, _):
    count = int(rng.integers(1, 5))
    frequency = rng.uniform(600, 1500)
    length = rng.uniform(0.08, 0.2)
    gaps = rng.uniform(0.15, 0.8, count)
    gaps *= min(1.0, (CLIP_SECONDS - 0.05 - count * length) / gaps.sum())  # every beep inside the clip
    parts = []
    for gap in gaps:
        parts += [tone(rng, frequency, frequency, length), np.zeros(int(gap * RATE))]
    clip = place(rng, np.concatenate(parts))
    if rng.random() < 0.5:  # faint background noise
        clip = clip + noise(rng, rng.choice(["white", "pink"]), len(clip) / RATE) * rng.uniform(0.02, 0.08)
    return clip, "how many beeps are there?", NUMBERS[count]


def noise_item(rng, _):
    colour = rng.choice(["white", "pink", "brown"])
    return place(rng, noise(rng, colour, rng.uniform(1.0, 2.5))), "what color is the noise?", colour


def mixture_item(rng, _):
    colour = rng.choice(["white", "pink", "brown"])
    pitch = rng.choice(list(PITCHES))
    seconds = rng.uniform(1.5, 2.5)
    mix = 0.5 * noise(rng, colour, seconds) + tone(rng, *PITCHES[pitch], seconds)
    return place(rng, mix), "what color is the noise behind the tone?", colour


def digit_item(rng, workdir):
    digit = int(rng.integers(0, 10))
    voice = rng.choice(["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp"])
    wav = Path(workdir) / "speech.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(130, 200))), "-p",
                    str(int(rng.integers(30, 70))), "-w", str(wav), NUMBERS[digit]], check=True)
    import librosa

    data, rate = soundfile.read(wav)
    speech = librosa.resample(data, orig_sr=rate, target_sr=RATE)
    return place(rng, speech * rng.uniform(0.5, 1.0)), "which number is spoken?", NUMBERS[digit]


def clip_item(rng, _, clips={}):
    if not clips:
        import librosa
        import pygame

        folder = Path(pygame.__file__).parent / "examples" / "data"
        for name in CLIPS:
            data, rate = soundfile.read(folder / name, always_2d=True)
            clips[name] = librosa.resample(data[:, 0], orig_sr=rate, target_sr=RATE)[: int(2.7 * RATE)]
    name = rng.choice(list(CLIPS))
    import librosa

    sound = librosa.resample(clips[name], orig_sr=RATE, target_sr=int(RATE * rng.uniform(0.9, 1.1)))
    return place(rng, sound * rng.uniform(0.4, 1.0) / max(np.max(np.abs(sound)), 1e-9)), "what sound is this?", \
        CLIPS[name]


TASKS = {"DemoTones-PitchQA": pitch_item, "DemoBeeps-CountQA": beeps_item, "DemoNoise-ColorQA": noise_item,
         "DemoSpeech-DigitQA": digit_item, "DemoClips-SoundQA": clip_item, "DemoMix-NoiseQA": mixture_item}


def write_split(out: Path, task: str, split: str, count: int, seed: int, workdir: str) -> None:
    rng = np.random.default_rng(seed)
    folder = out / "audio" / task / split
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for index in range(count):
        wave, prompt, answer = TASKS[task](rng, workdir)
        name = f"{index:05d}.flac"
        soundfile.write(folder / name, np.clip(wave, -1, 1).astype(np.float32), RATE, subtype="PCM_16")
        data[str(index)] = {"name": name, "prompt": prompt, "output": answer,
                            "duration": round(len(wave) / RATE, 3)}
    manifest = {"split": split, "split_path": f"audio/{task}/{split}", "flamingo_task": task, "total_num": count,
                "data": data}
    path = out / "manifests" / task / f"{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--train-per-task", type=int, default=600)
    p.add_argument("--test-per-task", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as workdir:
        for number, task in enumerate(TASKS):
            write_split(out, task, "train", args.train_per_task, args.seed * 1000 + number, workdir)
            write_split(out, task, "test", args.test_per_task, args.seed * 1000 + 500 + number, workdir)
            print(f"{task}: {args.train_per_task} train, {args.test_per_task} test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
