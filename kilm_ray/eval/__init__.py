"""Evaluation: does the model know more entities, and can it still do what BART did?"""
