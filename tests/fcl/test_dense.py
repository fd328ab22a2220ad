"""The dense (local) term against a loop reference, and decoder blocks pre-trained end to end
and loaded into the segmentation U-Net."""

import math

import pytest
import torch
import torch.nn.functional as F

from fcl_lightning.fcl.dense import dense_local_loss, intensity_view, region_vectors


def ref_dense(z1, z2, t):
    b, r, _ = z1.shape
    total, n = 0.0, 0
    for i in range(b):
        views = [z1[i, j] for j in range(r)] + [z2[i, j] for j in range(r)]
        for a in range(2 * r):
            pos = (a + r) % (2 * r)
            den = sum(math.exp(float(views[a] @ views[o]) / t) for o in range(2 * r) if o != a)
            total += -math.log(math.exp(float(views[a] @ views[pos]) / t) / den)
            n += 1
    return total / n


@pytest.mark.parametrize("b,r,d,t", [(1, 4, 3, 0.1), (3, 9, 8, 0.5), (2, 16, 5, 1.0)])
def test_dense_loss_matches_reference(b, r, d, t):
    g = torch.Generator().manual_seed(b * r)
    z1 = F.normalize(torch.randn(b, r, d, generator=g, dtype=torch.float64), dim=-1)
    z2 = F.normalize(torch.randn(b, r, d, generator=g, dtype=torch.float64), dim=-1)
    assert dense_local_loss(z1, z2, t).item() == pytest.approx(ref_dense(z1, z2, t), rel=1e-9)


def test_region_vectors_are_cell_means():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    v = region_vectors(x, 2)
    assert v.shape == (2, 4, 3)
    assert v[1, 3, 2].item() == pytest.approx(x[1, 2, 4:, 4:].mean().item())  # bottom-right cell


def test_intensity_view_keeps_geometry():
    x = torch.rand(5, 1, 16, 16)
    y = intensity_view(x, generator=torch.Generator().manual_seed(0))
    for i in range(5):  # an affine map of intensities: perfectly correlated pixel by pixel
        c = torch.corrcoef(torch.stack([x[i].flatten(), y[i].flatten()]))[0, 1]
        assert c.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow  # the suite's 3-minute budget (make test-slow)
def test_dense_fcl_pretrains_decoder_blocks_that_load_into_the_unet(tmp_path, tiny):
    from fcl_lightning.cli import main
    from fcl_lightning.lit.segment import SegmentationModule

    main(
        tiny(
            tmp_path,
            rounds=1,
            extra=[
                "--model.objective=fcl_lightning.fcl.objectives.DenseFCLObjective",
                "--model.objective.grid=2",
                "--model.decoder_levels=2",
            ],
        )
    )
    enc = torch.load(tmp_path / "encoder.pt", weights_only=True)
    dec = {k for k in enc if k.startswith("decoder.")}
    assert dec and {k.split(".")[1] for k in dec} == {"0", "1"}  # the two deepest blocks
    seg = SegmentationModule(features=[8, 16, 16, 16], pretrained=str(tmp_path / "encoder.pt"))
    for k in dec:
        assert torch.equal(seg.net.state_dict()[k], enc[k]), k
    metrics = (next((tmp_path / "logs").glob("version_*")) / "metrics.csv").read_text().splitlines()[0]
    assert "round/train/loss_dense" in metrics


def test_dense_objective_without_decoder_is_a_clear_error():
    from fcl_lightning.fcl.objectives import DenseFCLObjective
    from fcl_lightning.lit.pretrain import ContrastivePretrainModule

    with pytest.raises(ValueError, match="decoder_levels"):
        ContrastivePretrainModule(features=[8, 16, 16], objective=DenseFCLObjective())


def test_across_batch_loss_is_the_loss_over_all_regions_of_the_batch():
    g = torch.Generator().manual_seed(3)
    z1 = F.normalize(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), dim=-1)
    z2 = F.normalize(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), dim=-1)
    b, r, d = z1.shape
    ref = ref_dense(z1.reshape(1, b * r, d), z2.reshape(1, b * r, d), 0.2)  # every region of the batch is a negative
    assert dense_local_loss(z1, z2, 0.2, across_batch=True).item() == pytest.approx(ref, rel=1e-9)
    assert dense_local_loss(z1, z2, 0.2, across_batch=True).item() > dense_local_loss(z1, z2, 0.2).item()


def test_crop_warp_stays_inside_the_image_and_maps_features_like_pixels():
    from fcl_lightning.fcl.dense import random_crop_warp, warp

    theta = random_crop_warp(64, max_rotate_deg=45, scale=(0.5, 0.7), generator=torch.Generator().manual_seed(0))
    grid = F.affine_grid(theta, [64, 1, 9, 9], align_corners=False)
    assert grid.abs().max() < 1  # every sample point lands inside the image, never in padding
    # a coordinate image: warping it returns, at each output pixel, the input point it samples
    n, h = 4, 32
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h + 1)[:-1] + 1 / h, torch.linspace(-1, 1, h + 1)[:-1] + 1 / h, indexing="ij"
    )
    coords = torch.stack([xs, ys])[None].repeat(n, 1, 1, 1)
    th = theta[:n]
    out = warp(coords, th)
    expect = F.affine_grid(th, [n, 2, h, h], align_corners=False).permute(0, 3, 1, 2)
    assert torch.allclose(out, expect, atol=1e-5)
    # the same map warps a coarser feature map of the image consistently (normalised coordinates)
    small = F.avg_pool2d(coords, 4)
    assert torch.allclose(F.avg_pool2d(warp(coords, th), 4), warp(small, th), atol=0.02)


def test_crop_warp_rejects_a_window_that_cannot_fit():
    from fcl_lightning.fcl.dense import random_crop_warp

    with pytest.raises(ValueError, match="scale"):
        random_crop_warp(2, max_rotate_deg=15, scale=(0.5, 0.9))
