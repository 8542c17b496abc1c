"""Write the offline digits segmentation demo data (see DigitsSegDataset)."""
import argparse

from mmgradfilt.datasets.digits_seg import make_digits_seg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Composite scikit-learn digits onto canvases with '
        'per-pixel labels, in MMSeg layout (img_dir/, ann_dir/)')
    parser.add_argument(
        'data_root', nargs='?', default='data/digits_seg',
        help='output folder (default: data/digits_seg)')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    parser.add_argument('--size', type=int, default=64, help='canvas side')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    counts = make_digits_seg(args.data_root, seed=args.seed, size=args.size)
    print(f'Wrote {sum(counts.values())} canvases to {args.data_root}: ' +
          ', '.join(f'{split} {num}' for split, num in counts.items()))


if __name__ == '__main__':
    main()
