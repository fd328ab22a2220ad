"""fcl_lightning.compat: every private member of Lightning (and argparse) the project uses is there
in the installed versions; a Lightning release that moves one fails here, naming it."""

from fcl_lightning import compat


def test_the_private_members_the_project_uses_exist():
    assert compat.check() == []


def test_a_reused_trainer_restarts_its_epochs_and_gets_more_steps():
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=3)
    trainer.fit_loop.epoch_progress.total.completed = 2
    compat.restart_epochs(trainer)
    assert trainer.fit_loop.epoch_progress.total.completed == 0
    compat.extend_max_steps(trainer, 5)
    assert trainer.fit_loop.epoch_loop.max_steps == trainer.global_step + 5


def test_closing_a_wandb_logger_that_never_started_starts_nothing(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    lg = WandbLogger(save_dir=str(tmp_path), offline=True)
    compat.close_wandb_run(lg)
    assert lg._experiment is None and not any(tmp_path.iterdir())
