"""python -m weights_conversion CHECKPOINT --variant NAME --output OUT.weights.h5 [--keras OUT.keras] [--verify]

The mapping itself lives in keras_sequencer.weights.convert (shared with the model loader).
"""

import argparse
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion",
        description="Convert a timm or authors' Sequencer2D checkpoint to Keras.",
    )
    parser.add_argument("checkpoint", help=".safetensors, .pth, .pt or .bin file")
    parser.add_argument("--variant", default="sequencer2d_s", help="registry name (see keras_sequencer.list_models())")
    parser.add_argument("--output", help="Keras .weights.h5 to write")
    parser.add_argument("--keras", help="also write a full .keras model here")
    parser.add_argument("--verify", action="store_true", help="compare logits with timm (needs timm)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference for --verify")
    parser.add_argument("--image-size", type=int, default=224, help="input size used by --verify")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    if not args.output and not args.keras:
        parser.error("give --output OUT.weights.h5 and/or --keras OUT.keras")
    if args.output and not args.output.endswith(".weights.h5"):
        parser.error("--output must end with .weights.h5")
    if args.keras and not args.keras.endswith(".keras"):
        parser.error("--keras must end with .keras")
    for path in (args.output, args.keras):
        if path and os.path.exists(path) and not args.overwrite:
            parser.error(f"{path} exists; pass --overwrite to replace it")
    return args


def verify(model, state_dict, variant, image_size):
    """Runs timm and the Keras model on the same random images; returns (max diff, agreement)."""
    import numpy as np
    import timm
    import torch

    from keras_sequencer.weights.convert import normalize_state_dict
    from keras_sequencer.imagenet import preprocess_input

    name = variant.replace("_392", "")
    if name not in timm.list_models("sequencer*"):
        raise SystemExit(f"--verify: timm has no {name!r} (it defines {timm.list_models('sequencer*')})")
    reference = timm.create_model(name, pretrained=False, num_classes=model.output_shape[-1])
    timm_state = {k: torch.from_numpy(v) for k, v in normalize_state_dict(state_dict).items()}
    reference.load_state_dict(timm_state)
    reference.eval()
    images = np.random.default_rng(0).uniform(0, 255, (4, image_size, image_size, 3)).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(preprocess_input(images, normalize=True).transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model.predict(images, verbose=0))
    diff = float(np.abs(got - expected).max())
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    return diff, agreement


def main(argv=None):
    args = parse_args(argv)
    if args.verify:
        try:  # torch/timm before TensorFlow: the other order crashes with TF 2.21.
            import timm  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            print("--verify needs timm and torch: pip install timm torch", file=sys.stderr)
            return 2

    import keras_sequencer as ks
    from keras_sequencer.files import save_atomically
    from keras_sequencer.weights import WeightsError, read_checkpoint

    if args.variant not in ks.list_models():
        print(f"Unknown variant {args.variant!r}; choose from {', '.join(ks.list_models())}", file=sys.stderr)
        return 2
    try:
        state_dict = read_checkpoint(args.checkpoint)
        # Logits out (no softmax) so --verify compares like with like; the saved
        # weights are the same either way.
        model = ks.create_model(args.variant, input_shape=(None, None, 3), classifier_activation=None)
        ks.load_torch_state_dict(model, state_dict, source=f"checkpoint {args.checkpoint!r}")
    except (WeightsError, ks.CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    status = 0
    if args.verify:
        diff, agreement = verify(model, state_dict, args.variant, args.image_size)
        print(f"max abs logit difference vs timm: {diff:.3g} (tolerance {args.tolerance:g})")
        print(f"top-1 agreement with timm: {agreement:.3f}")
        if diff > args.tolerance:
            print("error: the converted model does not match timm", file=sys.stderr)
            status = 1
    if status == 0:
        if args.output:
            save_atomically(model.save_weights, args.output)
            print(f"wrote {args.output}")
        if args.keras:
            model = ks.create_model(args.variant)  # softmax head for users
            ks.load_torch_state_dict(model, state_dict)
            save_atomically(model.save, args.keras)
            print(f"wrote {args.keras}")
    return status


if __name__ == "__main__":
    sys.exit(main())
