"""Conv shapes that every path of the op (reference, C++, Triton) must take
with the same gradients; shared by the path-comparison tests."""

# unequal pairs included, where the axes are easy to mix up (radius (1, 4);
# dilation (1, 8) with radius 4; dilation 4 with radius (2, 8)), a stride
# pair, and the usual ones
OP_CASES = [
    dict(padding=(1, 1)),
    dict(stride=(2, 2), padding=(1, 1)),
    dict(padding=(12, 12), dilation=(12, 12), radius=(3, 3)),
    dict(padding=(1, 1), groups=8),
    dict(padding=(0, 0), radius=(5, 5)),
    dict(padding=(1, 1), radius=(1, 4)),
    dict(padding=(1, 8), dilation=(1, 8), radius=(4, 4)),
    dict(padding=(4, 4), dilation=(4, 4), radius=(2, 8)),
    dict(stride=(2, 1), padding=(1, 1), radius=(2, 4), groups=8),
]
# 37x45: partial blocks everywhere; 40x48: the blocks of most cases divide
# it, so the reference takes its exact-tiling branch
OP_SIZES = [(37, 45), (40, 48)]
