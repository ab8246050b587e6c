"""Synthetic speech made here with Debian's espeak-ng: held-out sentences for checks that must
not be tuned to the 12 dev recordings (other voices, other words), and speech in other
languages. Robotic, so read its word error rates as relative, never as accuracy on people.

    apt-get install espeak-ng
"""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import attrs
import numpy as np

__all__ = ["ENGLISH", "OTHER_LANGUAGES", "Clip", "available", "english", "other_language",
           "speak"]

# Thirty sentences of the kind a call centre or a voice agent hears, 2-4 s each when spoken.
ENGLISH = (
    "I would like to check the balance on my savings account.",
    "Can you tell me when my order will arrive?",
    "The meeting has been moved to Thursday afternoon.",
    "Please send the invoice to my work email address.",
    "My flight number is two four seven to Chicago.",
    "I think there is a mistake on my last bill.",
    "We need three more chairs in the conference room.",
    "The weather forecast says it will rain tomorrow morning.",
    "Could you repeat the last part more slowly?",
    "She left the keys on the kitchen table.",
    "Our internet connection keeps dropping every evening.",
    "Transfer five hundred dollars to my checking account.",
    "The package was delivered to the wrong address.",
    "I want to cancel my subscription at the end of the month.",
    "He plays the piano every Sunday at the church.",
    "The train to Boston leaves at half past nine.",
    "Please hold while I connect you to a supervisor.",
    "My password reset link has expired again.",
    "We are open from eight in the morning until six.",
    "The doctor asked me to come back next week.",
    "There are twelve apples in the basket on the porch.",
    "Turn left at the second traffic light.",
    "I never received a confirmation number for my booking.",
    "The children are playing football in the park.",
    "Your call is important to us, so please stay on the line.",
    "Can I change the delivery date to Friday?",
    "The printer on the third floor is out of paper.",
    "Thank you for your patience, have a great day.",
    "I lost my card yesterday and need a replacement.",
    "The river flows quietly past the old stone bridge.",
)
_ENGLISH_VOICES = ("en-us", "en-gb", "en-us+m3", "en-us+f2", "en-gb-x-rp+m5", "en-us+f4")

# Ten sentences each in German, Spanish and French (espeak-ng voice, sentences).
OTHER_LANGUAGES = {
    "de": ("de", (
        "Guten Morgen, ich möchte meinen Kontostand überprüfen.",
        "Können Sie mir sagen, wann meine Bestellung ankommt?",
        "Das Treffen wurde auf Donnerstagnachmittag verschoben.",
        "Bitte schicken Sie die Rechnung an meine E-Mail-Adresse.",
        "Ich glaube, auf meiner letzten Rechnung ist ein Fehler.",
        "Der Zug nach Berlin fährt um halb zehn ab.",
        "Meine Internetverbindung bricht jeden Abend ab.",
        "Ich habe gestern meine Karte verloren.",
        "Die Kinder spielen im Park Fußball.",
        "Vielen Dank für Ihre Geduld und einen schönen Tag.",
    )),
    "es": ("es", (
        "Buenos días, quiero consultar el saldo de mi cuenta.",
        "¿Puede decirme cuándo llegará mi pedido?",
        "La reunión se ha cambiado al jueves por la tarde.",
        "Por favor, envíe la factura a mi correo electrónico.",
        "Creo que hay un error en mi última factura.",
        "El tren a Madrid sale a las nueve y media.",
        "Mi conexión a internet se corta todas las noches.",
        "Ayer perdí mi tarjeta y necesito otra.",
        "Los niños juegan al fútbol en el parque.",
        "Gracias por su paciencia y que tenga un buen día.",
    )),
    "fr": ("fr", (
        "Bonjour, je voudrais vérifier le solde de mon compte.",
        "Pouvez-vous me dire quand ma commande arrivera?",
        "La réunion a été déplacée à jeudi après-midi.",
        "Veuillez envoyer la facture à mon adresse électronique.",
        "Je crois qu'il y a une erreur sur ma dernière facture.",
        "Le train pour Paris part à neuf heures et demie.",
        "Ma connexion internet se coupe tous les soirs.",
        "J'ai perdu ma carte hier et j'en ai besoin d'une autre.",
        "Les enfants jouent au football dans le parc.",
        "Merci de votre patience et bonne journée.",
    )),
}


@attrs.frozen
class Clip:
    audio: np.ndarray = attrs.field(eq=False, repr=False)  # 16 kHz float32
    text: str
    voice: str


def available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str, words_per_minute: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng's `voice`, as 16 kHz float32 samples."""
    from sttd.audio import decode_wav

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout",
                          text], capture_output=True, check=True).stdout
    with wave.open(io.BytesIO(wav)):  # a check that espeak-ng gave a WAV at all
        pass
    return decode_wav(wav)


def english() -> list[Clip]:
    """`ENGLISH`, each sentence in one of six voices at 150-189 words a minute."""
    return [Clip(speak(text, _ENGLISH_VOICES[i % len(_ENGLISH_VOICES)], 150 + (i * 7) % 40),
                 text, _ENGLISH_VOICES[i % len(_ENGLISH_VOICES)])
            for i, text in enumerate(ENGLISH)]


def other_language(code: str) -> list[Clip]:
    """`OTHER_LANGUAGES[code]`'s sentences, spoken by that language's espeak-ng voice."""
    voice, sentences = OTHER_LANGUAGES[code]
    return [Clip(speak(text, voice, 150 + (i * 7) % 30), text, voice)
            for i, text in enumerate(sentences)]
