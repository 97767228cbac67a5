from model.AuxNet import AuxNet, AuxNetOutput

__all__ = ["AuxNet", "AuxNetOutput"]
