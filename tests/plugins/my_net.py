"""A user architecture file: ``build`` (the default entry) and a class picked with entry="MyNet"."""


def build(task=None, width: int = 4):
    return ("tiny-net", width)


class MyNet:
    def __init__(self, task=None, width: int = 4):
        self.width = width
