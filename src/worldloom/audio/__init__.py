"""Speech as tokens (issue 16, requirement 7; docs/audio.md).

    speech.py       espeak-ng as a subprocess: missions spoken in varied voices, speeds, pitches; wav read/write
    mel.py          MelSpec: log-mel frames (torch.stft + a mel filterbank) and Griffin-Lim back to a waveform
    utterances.py   spoken missions as data (texts, voices, log-mel frames), compressed .npz in the run folder
    autoencoder.py  MelAutoencoder: 1-D conv encoder -> vision's EMAQuantizer -> decoder; encode / decode
    tokenizer.py    AudioTokenizer: the observation-tokenizer protocol over "mel" (kind "audio"), wave(ids)
    evaluate.py     `worldloom eval` of an audio-tokenizer run

The recipe that trains one is ``worldloom.recipes.audio_tokenizer`` (`worldloom train tokenizer-audio`).
Modules import lazily: ``import worldloom.audio`` needs neither espeak-ng nor a trained model.
"""
