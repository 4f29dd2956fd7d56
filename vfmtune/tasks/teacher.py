"""The frozen teacher a distiller carries: out of the student's checkpoint, optimiser and train mode."""

from __future__ import annotations

from typing import Any


class FrozenTeacher:
    """Mixin for a LightningModule that distils from a trained model. The teacher is frozen, merged if it
    is a LoRA model (it then runs at plain speed), kept in eval mode whatever the student's mode (its BN
    statistics and dropout never change its targets), and stored outside the registered submodules, so
    it stays out of the student's checkpoint and optimiser."""

    def set_teacher(self, teacher: Any | None) -> None:
        if teacher is not None:
            teacher = teacher.eval().requires_grad_(False)
            if hasattr(teacher.backbone, "merge_and_unload"):
                teacher.backbone = teacher.backbone.merge_and_unload()
        self.__dict__["teacher"] = teacher

    def frozen_teacher(self) -> Any:
        """The teacher; raises when the module was loaded from a checkpoint without one."""
        teacher = self.__dict__.get("teacher")
        if teacher is None:
            raise ValueError(f"This {type(self).__name__} was loaded without its teacher; it can predict but not train.")
        return teacher

    def train(self, mode: bool = True) -> Any:
        super().train(mode)  # type: ignore[misc]  # nn.Module.train, next in the subclass's MRO
        if self.__dict__.get("teacher") is not None:
            self.__dict__["teacher"].eval()
        return self


