"""Inference and export: the filter exists only in backward."""
import pytest
import torch


@pytest.fixture(scope='module')
def seg_models(build_seg_model):
    """The tiny DeepLabV3, vanilla and filtered, same weights, eval mode."""
    return build_seg_model(False).eval(), build_seg_model(True).eval()


@pytest.fixture(scope='module')
def seg_inputs(seg_models, seg_batch):
    return seg_models[0].data_preprocessor(seg_batch, False)['inputs']


@pytest.mark.parametrize('grad', [False, True], ids=['no_grad', 'grad'])
def test_eval_outputs_equal_vanilla(seg_models, seg_inputs, grad):
    vanilla, filtered = seg_models
    with torch.set_grad_enabled(grad):
        expected = vanilla(seg_inputs, mode='tensor')
        assert torch.equal(filtered(seg_inputs, mode='tensor'), expected)
    with torch.no_grad():
        preds = filtered(seg_inputs, mode='predict')
        assert len(preds) == len(seg_inputs)


def test_jit_trace(seg_models, seg_inputs, tmp_path):
    vanilla, filtered = seg_models
    with torch.no_grad():
        traced = torch.jit.trace(filtered, (seg_inputs, ))
        expected = vanilla(seg_inputs)
    # plain convolutions (22 in the backbone, 7 in the head), no Python op
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert kinds.count('aten::_convolution') == 29
    assert 'prim::PythonOp' not in kinds
    torch.jit.save(traced, str(tmp_path / 'deeplabv3.pt'))
    loaded = torch.jit.load(str(tmp_path / 'deeplabv3.pt'))
    with torch.no_grad():
        assert torch.equal(loaded(seg_inputs), expected)


def test_torch_export(seg_models, seg_inputs):
    vanilla, filtered = seg_models
    with torch.no_grad():
        program = torch.export.export(filtered, (seg_inputs, ))
        expected = vanilla(seg_inputs)
        assert torch.equal(program.module()(seg_inputs), expected)


def test_onnx_export(build_resnet18, tmp_path):
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    vanilla, filtered = build_resnet18(False).eval(), build_resnet18(True).eval()
    inputs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    path = str(tmp_path / 'resnet18.onnx')
    with torch.no_grad():
        torch.onnx.export(filtered, (inputs, ), path)
        expected = vanilla(inputs)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    outputs = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    torch.testing.assert_close(torch.from_numpy(outputs[0]), expected,
                               rtol=1e-4, atol=1e-4)
