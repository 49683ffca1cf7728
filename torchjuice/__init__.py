"""torchjuice"""
