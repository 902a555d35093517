"""Modality binding (ImageBind-style): views, captions and action sequences in one embedding space.

    items.py      one moment of a BabyAI level as a view, a caption and the shortest path to its object
    data.py       items as id rows [view | caption | actions]
    model.py      an encoder per modality (frame encoder; bidirectional layer stacks), unit embeddings
    loss.py       symmetric InfoNCE with a learned temperature over the trained pairs (text as the hub)
    retrieval.py  R@1 / R@5 both ways and their chance levels, duplicates counted as right
    evaluate.py   `worldloom eval` of a bind run: every pair, the one never trained together included

The recipe is ``worldloom.recipes.bind`` (preset ``bind``); docs/binding.md.
"""
